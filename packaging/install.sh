#!/usr/bin/env bash
# Install inboxd from this offline bundle: no network, every wheel checked against its hash.
#
#   sudo ./install.sh [--prefix /opt/inboxd] [--python python3]
#
# Makes a venv at --prefix (default /opt/inboxd) with the system's Python, which must be the
# version this bundle was built for (@PYTHON@), and installs requirements.txt from wheels/
# with `pip install --no-index --require-hashes`. Run again with a newer bundle to upgrade in
# place. Then `sudo /opt/inboxd/bin/inboxd install-files` puts the config, the unit and the
# sysusers file in place (README "Install on a logging PC"). Made by packaging/bundle.py.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
want=@PYTHON@
prefix=/opt/inboxd
python=python3

usage() { sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
fail() {
    echo "install.sh: $*" >&2
    exit 1
}

while (($#)); do
    case $1 in
    --prefix) prefix=${2:?--prefix needs a folder}; shift 2 ;;
    --prefix=*) prefix=${1#--prefix=}; shift ;;
    --python) python=${2:?--python needs a command}; shift 2 ;;
    --python=*) python=${1#--python=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; fail "unknown option $1" ;;
    esac
done

version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

have=$(version_of "$python" 2>/dev/null) || fail "no Python at '$python': pass --python /path/to/python$want"
[[ $have == "$want" ]] \
    || fail "this bundle holds wheels for Python $want, but $python is $have: use a bundle built with \`packaging/bundle.py --python $have\`, or pass --python python$want"

if [[ -x $prefix/bin/python ]]; then
    venv_has=$(version_of "$prefix/bin/python") || fail "$prefix/bin/python does not run: remove $prefix and install again"
    [[ $venv_has == "$want" ]] \
        || fail "$prefix was made with Python $venv_has (the system's Python changed?): remove $prefix (your config in /etc/inboxd and the state in /var/lib/inboxd stay), then install again"
    echo "upgrading the inboxd in $prefix"
else
    # Debian and Ubuntu ship venv's pip bootstrap separately: without it `venv` leaves a
    # half-made folder behind, so ask first.
    "$python" -c 'import ensurepip, venv' 2>/dev/null \
        || fail "Python's venv module is missing: install it (Debian/Ubuntu: sudo apt install python3-venv), then run this again"
    "$python" -m venv "$prefix"
fi

# No index at all: pip may only take the wheels next to this script, each with its hash.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$prefix/bin/python" -m pip install --quiet --no-index --find-links "$here/wheels" \
    --require-hashes --no-deps -r "$here/requirements.txt"
"$prefix/bin/python" -m pip check >/dev/null || "$prefix/bin/python" -m pip check
echo "installed $("$prefix/bin/inboxd" --version) in $prefix"
echo "next: sudo $prefix/bin/inboxd install-files   (README \"Install on a logging PC\")"
