#!/usr/bin/env bash
# Writes what docker-compose.yml needs and the repository must never hold: .env (from
# .env.example) and secrets/ with fresh random passwords. Existing files are kept, so a
# real realm key written to secrets/realm_key is never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 077
mkdir -p secrets
[ -f .env ] || cp .env.example .env
random() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
if [ ! -f secrets/rabbitmq.conf ] || [ ! -f secrets/amqp_url ]; then
    password=$(random)   # URL-safe alphabet: nothing to percent-encode in the AMQP URL
    printf 'default_user = bridge\ndefault_pass = %s\nloopback_users.guest = true\n' "$password" > secrets/rabbitmq.conf
    printf 'amqp://bridge:%s@rabbitmq:5672/\n' "$password" > secrets/amqp_url
fi
# The simulator accepts this key; replace it with your own realm key for the real stream.
[ -f secrets/realm_key ] || printf 'demo-%s\n' "$(random)" > secrets/realm_key
[ -f secrets/grafana_admin_password ] || random > secrets/grafana_admin_password
# The containers run as non-root users that must be able to read the mounted files.
chmod 644 secrets/*   # secrets/ itself is 0700 (umask 077): other host users cannot reach them
echo "wrote .env and secrets/ (Grafana: user admin, password in secrets/grafana_admin_password)"
