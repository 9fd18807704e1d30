#!/bin/sh
# Installs Debian's chromium when /usr/bin/chromium is missing, for tests/test_report_browser.py and the
# Playwright tests (tests/test_platform_page.py, tests/test_ui_trigger.py: Playwright drives this binary through
# executable_path and never downloads a browser). Run by those tests' fixtures (needs root, as in the dev
# container); does nothing when present.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "setup_browser.sh: /usr/bin/chromium is missing and this is not root; run: sudo apt-get install -y chromium" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
