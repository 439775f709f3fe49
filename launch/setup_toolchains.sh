#!/usr/bin/env bash
# Install the HumanEvalPack execution toolchains and test dependencies (idempotent; Debian/Ubuntu, root or sudo).
#
# What `megaocto eval humanevalpack` runs programs with:
#   python  python3                       (present on any machine that runs megaocto)
#   js      node                          apt: nodejs
#   java    javac / java                  apt: default-jdk-headless
#   cpp     g++ + boost::any + OpenSSL    apt: g++ libboost-dev libssl-dev
#   go      go + testify (GOPATH mode)    apt: golang-go golang-github-stretchr-testify-dev
#   rust    cargo + rand/regex/md5 crates apt: librust-{rand,regex,md5,aho-corasick,memchr}-dev (offline crate
#                                         sources under /usr/share/cargo/registry); cargo/rustc from rustup or apt
# The Go module proxy and crates.io need not be reachable: Go tests run with GO111MODULE=off and
# GOPATH=/usr/share/gocode, and the shared cargo project's .cargo/config.toml (written below) replaces crates.io
# with Debian's directory registry.
#
# Usage: bash launch/setup_toolchains.sh            # only the missing packages are installed
#        SKIP_APT=1 bash launch/setup_toolchains.sh # only write the cargo config (packages installed by hand)
# Environment: MEGAOCTO_EVAL_CACHE (default ~/.cache/megaocto/eval) — where the shared cargo project lives; must
# match the directory `megaocto eval` uses (the same variable).
set -euo pipefail

PACKAGES=(golang-go libboost-dev libssl-dev golang-github-stretchr-testify-dev
          librust-rand-dev librust-regex-dev librust-md5-dev librust-aho-corasick-dev librust-memchr-dev)
# Only installed when the command is missing (the image may carry its own node/java/g++/cargo).
declare -A OPTIONAL=([node]=nodejs [javac]=default-jdk-headless [g++]=g++ [cargo]=cargo)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
for cmd in "${!OPTIONAL[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${OPTIONAL[$cmd]}")
done

if [ "${SKIP_APT:-0}" != 1 ] && [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup_toolchains: need root (or sudo) to apt-get install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  echo "setup_toolchains: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || echo "setup_toolchains: apt-get update failed; trying the install with the cached lists" >&2
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup_toolchains: all apt packages present"
fi

CACHE="${MEGAOCTO_EVAL_CACHE:-$HOME/.cache/megaocto/eval}"
mkdir -p "$CACHE/rust/.cargo"
# The same file megaocto/eval/toolchains.py writes (one source: megaocto/resources/cargo-debian-config.toml).
cp "$(dirname "${BASH_SOURCE[0]}")/../megaocto/resources/cargo-debian-config.toml" "$CACHE/rust/.cargo/config.toml"
echo "setup_toolchains: cargo config at $CACHE/rust/.cargo/config.toml"

# js-md5 (HumanEvalPack JavaScript/162 requires it; the paper used js-md5@0.7.3) from the npm registry, once.
if [ ! -f "$CACHE/node/node_modules/js-md5/package.json" ]; then
  if command -v npm >/dev/null 2>&1; then
    mkdir -p "$CACHE/node"
    npm install --silent --no-audit --no-fund --prefix "$CACHE/node" js-md5@0.7.3 >/dev/null \
      && echo "setup_toolchains: js-md5 in $CACHE/node/node_modules" \
      || echo "setup_toolchains: npm install js-md5@0.7.3 failed (only JavaScript/162 needs it)" >&2
  else
    echo "setup_toolchains: npm missing; JavaScript/162 (require('js-md5')) will fail" >&2
  fi
fi

# Report what is usable now (a missing one is not fatal here; `megaocto eval` names the package when it is needed).
for cmd in python3 node javac java g++ go cargo; do
  if command -v "$cmd" >/dev/null 2>&1; then echo "  ok      $cmd"; else echo "  MISSING $cmd" >&2; fi
done
