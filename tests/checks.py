"""tests/checks.py - the reporting shared by the Python script tests.

check() counts a check and prints one "[  OK  ]" or "[ FAIL ]" line with an
optional detail; note() prints an indented remark; summary() prints the
closing "N passed, N failed" line (meson's log and scripts/test.sh read the
exit status) and returns the exit status: 1 when any check failed.
"""
passed = 0
failed = 0


def check(name, ok, detail=""):
    """Counts and prints one check; returns ok."""
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
    print(f"[{'  OK  ' if ok else ' FAIL '}] {name}" + (f"  ({detail})" if detail else ""), flush=True)
    return ok


def note(msg):
    print(f"         {msg}", flush=True)


def summary(extra=""):
    """Prints "N passed, N failed" (and extra in parentheses); returns the exit status."""
    print(f"{passed} passed, {failed} failed" + (f" ({extra})" if extra else ""), flush=True)
    return 1 if failed else 0
