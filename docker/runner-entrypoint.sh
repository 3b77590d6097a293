#!/bin/bash
# Entrypoint of the runner image: registers the runner on its first start, then runs it.
#
# Registration happens only for `run` (the default command) and only while the config dir has
# no credentials.json; the credentials live in the volume, so a restarted or upgraded container
# keeps its identity. Any other command (`doctor`, `register`, `kube-token`, `--help`) is passed
# to outpost-runner unchanged.
#
# Variables:
#   OUTPOST_SERVER                   the server's URL (required to register)
#   OUTPOST_RUNNER_NAME              the runner's name (default: the container's host name)
#   OUTPOST_RUNNER_LABELS            comma-separated labels, e.g. aks-prod,linux
#   OUTPOST_RUNNER_REGISTRATION      `token` (default) or `entra` (Entra ID managed identity)
#   OUTPOST_REGISTRATION_TOKEN       the registration token, or
#   OUTPOST_REGISTRATION_TOKEN_FILE  a file holding it (waited for up to 120 s, e.g. written by
#                                    the compose file's init service)
#   OUTPOST_RUNNER_CLIENT_ID         with `entra`: the user-assigned managed identity's client id
set -euo pipefail

config_dir="${OUTPOST_RUNNER_CONFIG_DIR:-/var/lib/outpost-runner}"

if [[ "${1:-run}" != run || -s "$config_dir/credentials.json" ]]; then
  exec outpost-runner "$@"
fi

if [[ -z "${OUTPOST_SERVER:-}" ]]; then
  echo "outpost-runner-entrypoint: set OUTPOST_SERVER to the server's URL so the runner can register" >&2
  exit 64
fi
args=(register --server "$OUTPOST_SERVER" --name "${OUTPOST_RUNNER_NAME:-$(hostname)}")
if [[ -n "${OUTPOST_RUNNER_LABELS:-}" ]]; then
  args+=(--labels "$OUTPOST_RUNNER_LABELS")
fi

case "${OUTPOST_RUNNER_REGISTRATION:-token}" in
  entra)
    args+=(--entra)
    if [[ -n "${OUTPOST_RUNNER_CLIENT_ID:-}" ]]; then
      args+=(--client-id "$OUTPOST_RUNNER_CLIENT_ID")
    fi
    ;;
  token)
    if [[ -z "${OUTPOST_REGISTRATION_TOKEN:-}" && -n "${OUTPOST_REGISTRATION_TOKEN_FILE:-}" ]]; then
      for _ in $(seq 1 120); do
        [[ -s "$OUTPOST_REGISTRATION_TOKEN_FILE" ]] && break
        sleep 1
      done
      if [[ ! -s "$OUTPOST_REGISTRATION_TOKEN_FILE" ]]; then
        echo "outpost-runner-entrypoint: $OUTPOST_REGISTRATION_TOKEN_FILE did not appear within 120 s" >&2
        exit 1
      fi
      OUTPOST_REGISTRATION_TOKEN="$(<"$OUTPOST_REGISTRATION_TOKEN_FILE")"
    fi
    if [[ -z "${OUTPOST_REGISTRATION_TOKEN:-}" ]]; then
      echo "outpost-runner-entrypoint: set OUTPOST_REGISTRATION_TOKEN (or OUTPOST_REGISTRATION_TOKEN_FILE), or OUTPOST_RUNNER_REGISTRATION=entra" >&2
      exit 64
    fi
    # The token goes through the environment, never argv, so `ps` does not show it.
    export OUTPOST_REGISTRATION_TOKEN
    ;;
  *)
    echo "outpost-runner-entrypoint: OUTPOST_RUNNER_REGISTRATION must be token or entra, not ${OUTPOST_RUNNER_REGISTRATION}" >&2
    exit 64
    ;;
esac

outpost-runner "${args[@]}"
exec outpost-runner "$@"
