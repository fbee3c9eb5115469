"""Ray job entrypoint for the `audit-utility` stage.

ray job submit --runtime-env jobs/runtime_env.yaml -- python jobs/audit_utility.py --config FILE [key=value ...]
"""

from _entry import run

run("audit-utility")
