#!/bin/bash
# base-image.sh - builds a Debian 12 base image locally, for machines that
# reach Debian's package mirror but no image registry.
#
# Usage: base-image.sh IMAGE_NAME [TARBALL]
#   Runs debootstrap (minbase variant), trims the tree the way Debian's
#   official bookworm-slim image is trimmed (no docs, man pages or locales;
#   apt configured to keep no caches), and loads it with `docker import`.
#   With TARBALL, the root tree is also saved there (or, when TARBALL already
#   exists, imported from it without running debootstrap), which saves the
#   ~40 s of debootstrap on repeated runs.
#
# Environment: PGR_DEBIAN_MIRROR (default http://deb.debian.org/debian).
# Needs root (debootstrap chroots) and a reachable docker daemon.
set -euo pipefail

name=${1:?usage: base-image.sh IMAGE_NAME [TARBALL]}
tarball=${2:-}
mirror=${PGR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

import() {
  # CMD and PATH as in the official image, so the two are interchangeable.
  "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    - "$name" >/dev/null
}

if [[ -n $tarball && -s $tarball ]]; then
  import <"$tarball"
  echo "base-image: imported $name from $tarball"
  exit 0
fi

root=$(mktemp -d /var/tmp/pgr-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase bookworm "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# apt: the same sources and the same cache-free settings as bookworm-slim.
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: ${mirror}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${mirror%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CONF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CONF
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
echo 'Acquire::GzipIndexes "true";' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
printf 'APT::AutoRemove::SuggestsImportant "false";\n' \
  >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CONF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
CONF

# What those settings would have kept out, had they been there from the start.
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d \
  -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/{man,info,groff,linda,locale}/* \
  "$root"/usr/share/lintian/overrides/* \
  "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
  "$root"/var/lib/apt/lists/* "$root"/var/log/*.log \
  "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
# Docker provides these per container.
: >"$root/etc/hostname"
: >"$root/etc/resolv.conf"
rm -f "$root/etc/machine-id" && : >"$root/etc/machine-id"

if [[ -n $tarball ]]; then
  mkdir -p "$(dirname "$tarball")"
  tar --numeric-owner -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  import <"$tarball"
else
  tar --numeric-owner -C "$root" -c . | import
fi
echo "base-image: built $name with debootstrap ($(du -sh "$root" | cut -f1))"
