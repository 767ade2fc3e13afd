#!/usr/bin/env bash
# A development certificate authority, a server certificate it signs and a random bearer token,
# for the TLS proxy of `pixelrnn cluster --tls-cert ... --tls-key ... --token-file ...`:
#
#   scripts/dev_certs.sh DIR [NAME ...]
#
# DIR gets ca.pem (what clients trust: --root-cert), ca.key, server.pem (the server certificate
# followed by the CA's, the chain nginx sends), server.key and token (PIXELRNN_TOKEN). The server
# certificate names localhost, 127.0.0.1 and every NAME (a host name or an IP address, e.g. the
# Service's DNS name on Kubernetes): gRPC checks the name the client dialled against these.
# Keys and the token are readable by their owner only. For development and tests: a real
# deployment's certificate comes from its own CA.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 DIR [NAME ...]  (DIR: where ca.pem, server.pem, server.key and token go)" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "error: openssl not found (Debian: apt-get install openssl)" >&2; exit 1; }
dir=$1
shift
mkdir -p "$dir"
umask 077

names="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        names="$names,IP:$name"
    else
        names="$names,DNS:$name"
    fi
done

# EC keys: small and fast to make, and every gRPC TLS stack takes them.
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -days 825 \
    -subj "/CN=pixelrnn development CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -subj "/CN=pixelrnn proxy" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
extensions=$(mktemp)
trap 'rm -f "$extensions" "$dir/server.csr" "$dir/server.srl"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$names" >"$extensions"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -CAserial "$dir/server.srl" -days 825 -extfile "$extensions" -out "$dir/server.crt" 2>/dev/null
cat "$dir/server.crt" "$dir/ca.pem" >"$dir/server.pem"
rm -f "$dir/server.crt"
# 32 random bytes as URL-safe base64 without padding: the characters a bearer token may hold.
openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n' >"$dir/token"
chmod 644 "$dir/ca.pem" "$dir/server.pem"
echo "wrote $dir/ca.pem, $dir/server.pem, $dir/server.key, $dir/token (names: $names)"
