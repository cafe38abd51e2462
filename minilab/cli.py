"""What every script does at its edge: bad input becomes one line, not a stack trace."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn

from .data import DataError
from .hub import HubError


def run_main(main: Callable[[], int]) -> NoReturn:
    """Run a script's main(). A data, Hub or checkpoint problem (DataError, HubError, ValueError,
    OSError, or training that keeps going non-finite) prints `error: <what is wrong and how to fix it>` on
    stderr and exits with status 2; an interrupted training run (SIGINT/SIGTERM) says where its checkpoint is;
    results are written atomically at the very end, so nothing already written is lost. Under torchrun, a
    lost peer process is one line too (`distributed.PeerLost`), and the process group is left on the way out."""
    from .distributed import PeerLost, shutdown
    from .train import NonFiniteError, TrainingInterrupted

    try:
        code = main()
    except (DataError, HubError, ValueError, OSError, NonFiniteError, PeerLost) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except TrainingInterrupted as e:  # the loop saved a checkpoint first
        print(f"interrupted: {e}", file=sys.stderr)
        code = 143 if "SIGTERM" in str(e) else 130
    finally:
        shutdown()
    sys.exit(code)
