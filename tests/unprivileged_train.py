"""`resumax train` as the unprivileged user `nobody`, for tests of permission errors run as root.

Started as root, it imports everything the run needs first (the interpreter and the virtualenv
may live where `nobody` cannot read), then drops to nobody's uid and gid and runs the command.
It reads in process (`data.num_workers=0`): worker processes start from a fresh interpreter,
which nobody may not be allowed to run.
Usage: python tests/unprivileged_train.py --config FILE key=value ...
"""

import os
import pwd
import sys

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot  # noqa: E402, F401 (imported before the privileges are dropped)

import resumax.cli  # noqa: E402
import resumax.train.loop  # noqa: E402, F401

# The session's compilation cache (tests/conftest.py) is in root's private temporary directory.
jax.config.update("jax_compilation_cache_dir", None)
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
os.environ["HOME"] = "/tmp"
sys.exit(resumax.cli.main(["train", *sys.argv[1:], "data.num_workers=0"]))
