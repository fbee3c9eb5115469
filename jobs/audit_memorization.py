"""Ray job entrypoint for the `audit-memorization` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/audit_memorization.py --config FILE [key=value ...]
"""

from _entry import run

run("audit-memorization")
