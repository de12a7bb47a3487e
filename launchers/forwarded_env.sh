# Sourced by the multi-node launchers: the names of the variables set here that every rank on every node
# needs (torch's JIT builds, DeepSpeed's accelerator, threads, network interfaces, NCCL and hipscale knobs).
forwarded_env_names() {
  local name
  for name in PATH LD_LIBRARY_PATH TORCH_EXTENSIONS_DIR DS_ACCELERATOR OMP_NUM_THREADS \
              $(compgen -e | grep -E '^(NCCL|GLOO|TP|TORCH_NCCL|HIPSCALE)_' || true); do
    if [ -n "${!name:-}" ]; then echo "$name"; fi
  done
}
