package mounts

import (
	"strings"
	"testing"
)

const table = `/dev/vda / ext4 rw,relatime,discard,errors=remount-ro 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /var/spool tmpfs rw,nosuid 0 0
/dev/sdb1 /var/spool/gw ext4 rw,noatime 0 0
/dev/sdc1 /var/spool/gw ext4 rw,noatime,discard 0 0
/dev/sdd1 /mnt/usb\040stick vfat rw 0 0
`

func TestFind(t *testing.T) {
	for _, tc := range []struct {
		path, point, source string
		discard             bool
	}{
		{"/", "/", "/dev/vda", true},
		{"/etc/gwagent", "/", "/dev/vda", true},
		{"/var/spool", "/var/spool", "tmpfs", false},
		{"/var/spoolish", "/", "/dev/vda", true},                // a prefix of the name, not a parent
		{"/var/spool/gw/x", "/var/spool/gw", "/dev/sdc1", true}, // the later mount is on top
		{"/mnt/usb stick/spool", "/mnt/usb stick", "/dev/sdd1", false},
	} {
		m, err := Find(strings.NewReader(table), tc.path)
		if err != nil {
			t.Fatalf("%s: %v", tc.path, err)
		}
		if m.Point != tc.point || m.Source != tc.source || m.Has("discard") != tc.discard {
			t.Errorf("%s: got %s from %s, want %s from %s (discard %v)", tc.path, m, m.Source, tc.point, tc.source, tc.discard)
		}
	}
	if _, err := Find(strings.NewReader("proc /proc proc rw 0 0\n"), "/var"); err == nil {
		t.Error("a table without / found a mount for /var")
	}
}

func TestOfLive(t *testing.T) {
	m, err := Of(Table, "/proc/self")
	if err != nil || m.Type != "proc" {
		t.Fatalf("/proc/self: %v %v", m, err)
	}
}
