"""Preloaded by the fork server that starts a rank's DataLoader workers (hipscale.data.loading.loader), and by nothing
else: it imports the loader (torch, numpy, the decoders) once, and makes the server ignore the stop signals a
scheduler sends the whole process group (SIGTERM, SIGUSR1, SIGINT). The server starts with them blocked and
keeps them blocked, so a worker forked from it holds one pending until its init ignores them (PyTorch's worker
loop catches SIGTERM before that); the rank's main process decides how to stop. The server exits when the
rank does (multiprocessing's fork server watches its client), and the workers follow.
"""
import signal

import av  # noqa: F401 - the decoders of compressed clips (hipscale.data.format.clip_codec imports them on first
import decord  # noqa: F401 - use): once here, not in every worker of every epoch (0.1-0.3 s each)

import hipscale.data.loading.loader  # noqa: F401 - imported once here, inherited by every worker

for _sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
    signal.signal(_sig, signal.SIG_IGN)
