#!/bin/sh
# Runs as root inside the build VM (packer's shell provisioner, over SSH). Bakes the site files in
# and then removes everything that belongs to this one build boot, so that every machine made from
# the image gets its own identity on first boot.
#
# Environment (from the template): SITE_DIR (uploaded copy of packer/site/), SITE_NAME,
# SOURCE_IMAGE, SOURCE_SHA256, DISK_SIZE, PACKER_VERSION.
set -eu
log() { echo "provision: $*"; }

# Boot finished (root grown to the disk by systemd-repart + growfs), bounded by the unit timeouts.
state=$(timeout 300 systemctl is-system-running --wait || true)
log "system state: $state"
if [ "$state" != running ]; then
    systemctl list-units --failed --no-legend --plain || true
fi
log "root file system: $(df -h --output=size,used,avail / | tail -n 1)"
# Printed for the VM test packer_site_image_builds_and_boots (tests/tests/images.rs), which checks that the image's first boot makes new ones.
log "build machine-id: $(cat /etc/machine-id)"
log "build ssh host key: $(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub)"

# 1. Site files: packer/site/ is copied over / as root:root.
: "${SITE_DIR:?}"
files=$(cd "$SITE_DIR" && find . -type f | sed 's|^\./||' | sort)
if [ -z "$files" ]; then
    log "no site files arrived in $SITE_DIR"
    ls -laR "$SITE_DIR" || true
    exit 1
fi
find "$SITE_DIR" -mindepth 1 -type d -exec chmod 0755 {} +
find "$SITE_DIR" -type f -exec chmod 0644 {} +
cp -R --no-preserve=ownership "$SITE_DIR"/. /
for f in $files; do
    if ! cmp -s "$SITE_DIR/$f" "/$f"; then
        log "site file /$f was not installed"
        exit 1
    fi
    log "site file /$f"
done
rm -rf "$SITE_DIR"
cat >/etc/clusteros/image-info <<EOF
# How this image was made (packer/clusteros.json).
site=${SITE_NAME:-}
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
source_image=${SOURCE_IMAGE:-}
source_sha256=${SOURCE_SHA256:-}
disk_size=${DISK_SIZE:-}
packer=${PACKER_VERSION:-}
EOF
# The agent must accept the baked config (it refuses unknown keys and bad values).
if ! clusteros agent --help >/dev/null 2>&1; then
    log "clusteros binary missing or broken"
    exit 1
fi
systemctl restart clusteros-agent.service
sleep_left=30
until systemctl is-active --quiet clusteros-agent.service; do
    sleep_left=$((sleep_left - 1))
    if [ "$sleep_left" -le 0 ]; then
        log "the agent does not start with the site config:"
        journalctl -b -u clusteros-agent.service -n 30 --no-pager || true
        exit 1
    fi
    sleep 1
done
log "agent active with the site config"

# 2. Forget this boot: agent identity, secrets, keys, machine id, logs.
systemctl stop clusteros-agent.service
rm -rf /var/lib/clusteros/* /var/lib/clusteros/.[!.]* 2>/dev/null || true
rm -f /etc/munge/munge.key
# Host keys: clusteros-ssh-keygen.service makes new ones on the next boot.
rm -f /etc/ssh/ssh_host_*
# packer's throwaway key (provisioned from the ssh.authorized_keys.root credential).
rm -f /root/.ssh/authorized_keys
# "uninitialized": the next boot is a first boot and generates a new machine id.
printf 'uninitialized\n' >/etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed /var/lib/systemd/credential.secret
rm -rf /var/lib/systemd/network/* /var/lib/chrony/* /var/tmp/* /tmp/* 2>/dev/null || true
journalctl --rotate >/dev/null 2>&1 || true
rm -rf /var/log/journal/*
# Let the qcow2 shrink: hand the freed blocks back (the template attaches the disk with discard).
fstrim -v / || true
sync
log "done; powering off"
