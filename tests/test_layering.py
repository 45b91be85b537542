"""The libraries stand without the training driver above them."""
import subprocess
import sys


def test_importing_the_libraries_leaves_launch_out_of_sys_modules():
    code = ("import sys, dgc, dgc.horovod, sparse_train, sparse_train.live, sparse_train.codec; "
            "print(sorted(m for m in sys.modules if m == 'launch' or m.startswith('launch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"importing dgc and sparse_train pulled in {out}"
