#!/bin/sh
# The image listens on 0.0.0.0, which akosha-sync refuses without a daemon token.
# Use AKOSHA_SYNC_DAEMON_TOKEN when given; else keep a random one in the state folder
# (created once, 0600) so `docker run -p 8683:8683 IMAGE` is never an open daemon.
set -eu
if [ -z "${AKOSHA_SYNC_DAEMON_TOKEN:-}" ]; then
    state="${AKOSHA_SYNC_STATE_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/akosha-sync}"
    file="$state/daemon-token"
    if [ ! -s "$file" ]; then
        umask 077
        mkdir -p "$state"
        python -c 'import secrets; print(secrets.token_urlsafe(32))' > "$file"
        echo "akosha-sync: no AKOSHA_SYNC_DAEMON_TOKEN given; generated one in $file" \
             "(read it with: docker exec <container> cat $file)" >&2
    fi
    AKOSHA_SYNC_DAEMON_TOKEN="$(cat "$file")"
    export AKOSHA_SYNC_DAEMON_TOKEN
fi
exec "$@"
