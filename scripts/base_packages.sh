# Sourced by scripts/setup.sh and scripts/demo.sh: what both need from the system, PostgreSQL
# and openssl (the throwaway server's TLS certificate is made with it), added to need_apt when
# missing. Each script installs need_apt its own way.
need_apt=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || command -v postgres >/dev/null \
    || need_apt+=(postgresql)
command -v openssl >/dev/null || need_apt+=(openssl)
