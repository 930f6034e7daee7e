"""train.py with one checkpoint write held open, so that a test can kill the process in the middle of it.

    JAXGPT_TEST_HOLD_SAVE=latest/6:write python tests/save_blocker.py <train.py flags>

Started by tests/test_reliability.py as a subprocess. When the checkpoint named by the variable
(kind/step) is being saved, at the stage named after the colon, the process writes the path of the
checkpoint's temporary directory to the file $JAXGPT_TEST_HOLD_SAVE_MARKER and then waits forever:

    write   the temporary directory exists and the state is being written; the metadata is not written yet
    commit  every file is written; the directory is not yet marked complete and renamed into place

The hooks are Orbax's own steps (its JSON writer and its atomic rename), so the checkpoint code
under test runs unchanged.
"""

import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from orbax.checkpoint._src.handlers import json_checkpoint_handler  # noqa: E402
from orbax.checkpoint._src.path import atomicity  # noqa: E402

TARGET, STAGE = os.environ["JAXGPT_TEST_HOLD_SAVE"].split(":")
MARKER = os.environ["JAXGPT_TEST_HOLD_SAVE_MARKER"]
KIND, STEP = TARGET.split("/")
TMP = re.compile(rf"[/\\]checkpoints[/\\]{KIND}[/\\]{STEP}\.orbax-checkpoint-tmp[^/\\]*")


def hold(tmp_dir: str) -> None:
    with open(MARKER + ".part", "w") as f:
        f.write(tmp_dir)
    os.replace(MARKER + ".part", MARKER)
    while True:
        time.sleep(60)


if STAGE == "write":
    real_save = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, x, directory):
        found = TMP.search(str(directory))
        if found:
            hold(str(directory)[:found.end()])
        return await real_save(self, x, directory)

    json_checkpoint_handler.JsonCheckpointHandler._save_fn = save_fn
elif STAGE == "commit":
    real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        found = TMP.search(str(self.get()))
        if found and found.end() == len(str(self.get()).rstrip("/\\")):  # the step's directory, not an item's
            hold(str(self.get()))
        return await real_finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize
else:
    raise SystemExit(f"unknown stage {STAGE!r}")

import train  # noqa: E402

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
