"""Preloaded by the fork server that starts a rank's DataLoader workers (hipscale.data.loading.loader), and by nothing
else: it imports the loader (torch, numpy, PyAV) once, and makes the server ignore the stop signals a
scheduler sends the whole process group (SIGTERM, SIGUSR1, SIGINT). The server starts with them blocked and
keeps them blocked, so a worker forked from it holds one pending until its init ignores them (PyTorch's worker
loop catches SIGTERM before that); the rank's main process decides how to stop. The server exits when the
rank does (multiprocessing's fork server watches its client), and the workers follow.
"""
import signal

import hipscale.data.loading.loader  # noqa: F401 - imported once here (with the decoders of compressed clips),
                                     # inherited by every worker

for _sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(_sig, signal.SIG_IGN)
