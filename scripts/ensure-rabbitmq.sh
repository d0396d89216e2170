#!/usr/bin/env bash
# Makes sure RabbitMQ answers on 127.0.0.1:5672: starts it (installing the
# Debian package first if needed) when nothing listens there.
set -euo pipefail

listening() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if listening; then
  echo "RabbitMQ: already listening on 127.0.0.1:5672"
  exit 0
fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "RabbitMQ: installing the Debian package rabbitmq-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Do not let the package's maintainer scripts start a service manager.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq rabbitmq-server >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
echo "RabbitMQ: starting (rabbitmq-server -detached)"
rabbitmq-server -detached
for _ in $(seq 1 90); do
  if listening && rabbitmqctl -q status >/dev/null 2>&1; then
    echo "RabbitMQ: up"
    exit 0
  fi
  sleep 2
done
echo "RabbitMQ did not come up within 180 s" >&2
exit 1
