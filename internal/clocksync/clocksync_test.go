package clocksync

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

func TestRead(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	rtc := func(t *testing.T, at time.Time) string {
		dir := t.TempDir()
		os.MkdirAll(filepath.Join(dir, "rtc0"), 0o755)
		os.WriteFile(filepath.Join(dir, "rtc0", "since_epoch"), []byte(strconv.FormatInt(at.Unix(), 10)+"\n"), 0o644)
		return dir
	}
	file := func(t *testing.T) string {
		p := filepath.Join(t.TempDir(), "synchronized")
		os.WriteFile(p, nil, 0o644)
		return p
	}
	synced := func() (bool, error) { return true, nil }
	unsynced := func() (bool, error) { return false, nil }
	denied := func() (bool, error) { return false, syscall.EPERM } // ProtectClock=yes
	cases := []struct {
		name   string
		probe  func(t *testing.T) Probe
		want   Source
		client bool
	}{
		{"ok/kernel-synchronised", func(t *testing.T) Probe { return Probe{Kernel: synced} }, NTP, false},
		{"ok/timesyncd-flag-when-adjtimex-is-denied", func(t *testing.T) Probe { return Probe{Kernel: denied, TimesyncFile: file(t)} }, NTP, false},
		{"ok/rtc-agrees", func(t *testing.T) Probe { return Probe{Kernel: unsynced, RTCDir: rtc(t, now.Add(-3*time.Second))} }, RTC, false},
		{"fail/rtc-after-power-loss", func(t *testing.T) Probe {
			return Probe{Kernel: unsynced, RTCDir: rtc(t, time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC))}
		}, None, false},
		{"fail/rtc-behind-restored-clock", func(t *testing.T) Probe {
			return Probe{Kernel: unsynced, RTCDir: rtc(t, now.Add(-RTCTolerance-time.Second))}
		}, None, false},
		{"fail/no-flag-file", func(t *testing.T) Probe {
			return Probe{Kernel: denied, TimesyncFile: filepath.Join(t.TempDir(), "synchronized"), RTCDir: filepath.Join(t.TempDir(), "none")}
		}, None, false},
		{"fail/unsynchronised-with-client", func(t *testing.T) Probe {
			dir := t.TempDir()
			return Probe{Kernel: unsynced, Clients: []string{filepath.Join(dir, "chrony"), dir}}
		}, None, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := c.probe(t).Read(now)
			if r.Source != c.want {
				t.Fatalf("source %q (%s), want %q", r.Source, r.Detail, c.want)
			}
			if r.Detail == "" {
				t.Fatal("no detail")
			}
			if (r.Client != "") != c.client {
				t.Fatalf("client %q, want found=%v", r.Client, c.client)
			}
		})
	}
}

// On this machine: the real probes answer without panicking, adjtimex
// reads (or is refused with EPERM in a sandbox), and the uptime is positive.
func TestSystem(t *testing.T) {
	if _, err := KernelSynced(); err != nil && !errors.Is(err, syscall.EPERM) {
		t.Fatal(err)
	}
	r := System().Read(time.Now())
	if r.Uptime <= 0 {
		t.Fatalf("uptime %s", r.Uptime)
	}
	t.Logf("%+v", r)
}
