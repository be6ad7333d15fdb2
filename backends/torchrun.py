"""``python -m qplan.backends.torchrun ARGS``: torchrun (``torch.distributed.run``) with ARGS, whose
failure ends in its own failure summary (which rank, exit code) rather than a Python traceback.

torchrun ends every rank when one fails and raises ``ChildFailedError`` with that summary; this
prints the summary and exits 1, so `qplan run` shows the user one failure, not torchrun's stack.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as exc:
        print(exc.format_msg(), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
