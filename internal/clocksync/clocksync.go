// Package clocksync tells whether the system clock can be trusted to judge
// certificates, and why: synchronised by NTP, or kept by a real-time clock
// that agrees with it. A leaf: no state, nothing of gwagent's imported.
//
// The evidence, in order:
//   - the kernel's NTP status (adjtimex: STA_UNSYNC clear), which every NTP
//     client sets once it has disciplined the clock: systemd-timesyncd,
//     chrony, ntpd. It needs the adjtimex system call (read-only, no
//     capability); systemd's ProtectClock=yes forbids even that, which is
//     why gwagent's unit allows adjtimex and forbids the calls that set
//     the clock instead.
//   - systemd-timesyncd's flag file /run/systemd/timesync/synchronized, for
//     a sandbox that denies adjtimex.
//   - a real-time clock (/sys/class/rtc/rtcN/since_epoch, world-readable)
//     within RTCTolerance of the system clock: a board with a battery-backed
//     RTC that is right keeps the right time without NTP. A clock restored
//     from timesyncd's saved time (no RTC, or an RTC that lost its battery
//     and went back to 1970 or 2000) has no RTC that agrees with it.
package clocksync

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Source says what vouches for the system clock.
type Source string

const (
	// NTP: an NTP client synchronised the clock.
	NTP Source = "ntp"
	// RTC: not synchronised, but a real-time clock agrees with it.
	RTC Source = "rtc"
	// None: nothing vouches for it.
	None Source = ""
)

// RTCTolerance is how far a real-time clock may be from the system clock
// and still vouch for it (since_epoch has whole seconds; the system clock
// may have been stepped a little since boot).
const RTCTolerance = 2 * time.Minute

// Reading is what Probe.Read found.
type Reading struct {
	Source Source
	// Detail says which evidence, for logs and `gwagent check`.
	Detail string
	// Uptime is the time since boot (0 if unknown): NTP has had that long.
	Uptime time.Duration
	// Client names the NTP client found running ("" if none): waiting for
	// synchronisation is pointless without one.
	Client string
}

// Probe reads the evidence. Its fields are the outside world, so tests can
// give a machine without NTP or without RTC; System is this machine.
type Probe struct {
	// Kernel reports the kernel's NTP synchronisation flag.
	Kernel func() (bool, error)
	// TimesyncFile is systemd-timesyncd's flag file.
	TimesyncFile string
	// RTCDir holds the real-time clocks (rtc0, rtc1, ...).
	RTCDir string
	// Uptime reports the time since boot.
	Uptime func() (time.Duration, error)
	// Clients are paths that exist while an NTP client runs.
	Clients []string
}

// System is the probe of this machine.
func System() Probe {
	return Probe{Kernel: KernelSynced, TimesyncFile: "/run/systemd/timesync/synchronized", RTCDir: "/sys/class/rtc", Uptime: bootTime,
		// systemd-timesyncd's runtime directory, chronyd's, ntpd's pid file.
		Clients: []string{"/run/systemd/timesync", "/run/chrony", "/run/ntpd.pid"}}
}

// Read looks at the evidence for the system clock reading now.
func (p Probe) Read(now time.Time) Reading {
	var r Reading
	if p.Uptime != nil {
		r.Uptime, _ = p.Uptime()
	}
	if p.Kernel != nil {
		if ok, err := p.Kernel(); err == nil && ok {
			r.Source, r.Detail = NTP, "the kernel says the clock is synchronised (NTP)"
			return r
		}
	}
	if p.TimesyncFile != "" {
		if _, err := os.Stat(p.TimesyncFile); err == nil {
			r.Source, r.Detail = NTP, "systemd-timesyncd synchronised the clock ("+p.TimesyncFile+")"
			return r
		}
	}
	if name, diff, ok := p.agreeingRTC(now); ok {
		r.Source, r.Detail = RTC, fmt.Sprintf("not synchronised by NTP, but the real-time clock %s agrees with it (within %s)", name, diff.Round(time.Second))
		return r
	}
	r.Detail = "not synchronised by NTP, and no real-time clock agrees with it"
	for _, c := range p.Clients {
		if _, err := os.Stat(c); err == nil {
			r.Client = c
			break
		}
	}
	return r
}

// agreeingRTC finds a real-time clock within RTCTolerance of now.
func (p Probe) agreeingRTC(now time.Time) (string, time.Duration, bool) {
	if p.RTCDir == "" {
		return "", 0, false
	}
	ents, err := os.ReadDir(p.RTCDir)
	if err != nil {
		return "", 0, false
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(p.RTCDir, e.Name(), "since_epoch"))
		if err != nil {
			continue
		}
		sec, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			continue
		}
		diff := now.Sub(time.Unix(sec, 0)).Abs()
		if diff <= RTCTolerance {
			return e.Name(), diff, true
		}
	}
	return "", 0, false
}

// KernelSynced reads the kernel's NTP state (what timedatectl shows as
// "System clock synchronized"): adjtimex with no modes only reads.
func KernelSynced() (bool, error) {
	var tx unix.Timex
	state, err := unix.Adjtimex(&tx)
	if err != nil {
		return false, fmt.Errorf("adjtimex: %w", err)
	}
	return state != unix.TIME_ERROR && tx.Status&unix.STA_UNSYNC == 0, nil
}

// bootTime is the time since boot, suspend included.
func bootTime() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, fmt.Errorf("clock_gettime(CLOCK_BOOTTIME): %w", err)
	}
	return time.Duration(ts.Nano()), nil
}
