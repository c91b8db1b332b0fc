#!/bin/sh
# Certificates for deploy/nats: a private CA, the server's certificate and one client certificate.
#
#   deploy/nats/make-certs.sh [DIR] [SERVER_NAME ...]
#
# DIR defaults to deploy/nats/tls (git ignores it); the server names (DNS names or IP addresses
# the clients connect to) default to "nats localhost 127.0.0.1". Writes ca.pem, ca-key.pem,
# server-cert.pem, server-key.pem, client-cert.pem and client-key.pem, keys mode 0600. Keep
# ca-key.pem off the servers: it is only needed to issue more certificates. For your own PKI,
# issue the same three files from it instead (server: serverAuth with the names as subjectAltName;
# client: clientAuth). tests/security/test_deploy_config.py runs this script and a server on its output.
set -eu

dir=${1:-deploy/nats/tls}
[ $# -gt 0 ] && shift
names=${*:-nats localhost 127.0.0.1}
days=825

mkdir -p "$dir"
umask 077
cd "$dir"

san=""
for name in $names; do
    case $name in
        *[!0-9.]*) san="$san,DNS:$name" ;;
        *) san="$san,IP:$name" ;;
    esac
done
san=${san#,}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
    -subj "/CN=kvstate NATS CA" -keyout ca-key.pem -out ca.pem \
    -addext "basicConstraints=critical,CA:true" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

issue() {  # issue NAME CN EXTENSIONS
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$2" \
        -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
        -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

issue server "kvstate NATS server" "basicConstraints=CA:false
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
issue client "kvstate" "basicConstraints=CA:false
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ca.srl
chmod 0644 ca.pem server-cert.pem client-cert.pem
echo "certificates in $dir (server names: $names)"
