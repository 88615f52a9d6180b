"""Run localstripe without its disk store.

localstripe pickles its whole store to the fixed path /tmp/localstripe.pickle on every write
and reloads it at start: writes slow down as the store grows (timeouts in a long suite) and two
instances at once (parallel runs, a benchmark) corrupt each other's file ("pickle data was
truncated"). Tests want a fresh, private, in-memory Stripe each run.
"""

import sys

from localstripe import resources, server


def _no_disk(self: resources.Store) -> None:
    return None


resources.Store.dump_to_disk = _no_disk  # type: ignore[method-assign]
resources.Store.try_load_from_disk = _no_disk  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "localstripe"
    server.start()
