package agent

import (
	"fmt"
	"time"

	"github.com/gwagent/gwagent/internal/clocksync"
)

// defaultClockSyncWait is how long after boot the agent waits for NTP when
// nothing vouches for a clock that is past the build time. Long enough for
// DHCP and a first NTP answer on a slow link; short enough that a gateway
// with neither NTP nor a real-time clock (an isolated plant network, a dead
// RTC battery) still runs, on the clock it restored from its last shutdown.
const defaultClockSyncWait = 2 * time.Minute

// clockTrust remembers what vouched for the clock last, so the lifecycle
// logs a change once and not at every reconnect.
type clockTrust struct {
	last   clocksync.Source
	logged bool
	first  time.Time // the first reading nothing vouched for
}

// clockTrusted decides, for a clock already past the build time and the
// certificate's notBefore, whether certificates may be judged by it now:
//   - yes if NTP synchronised it, or a real-time clock agrees with it (a
//     board whose battery-backed RTC is right needs no NTP);
//   - no, for up to ClockSyncWait after boot, if nothing vouches for it:
//     the clock may be the time of the last shutdown, restored by
//     timesyncd, weeks behind; NTP normally answers within seconds;
//   - yes after that, or at once if no NTP client runs, with a warning:
//     waiting longer would hang a gateway that has no NTP at all, and its
//     clock is at least past the floor.
//
// When it says no, the reason is the clock-not-synchronised condition's.
func (a *Agent) clockTrusted(now time.Time) (string, bool) {
	r := a.opts.ClockSync(now)
	t := &a.trust
	if r.Source != clocksync.None {
		if !t.logged || t.last != r.Source {
			a.log.Info("clock", "trusted", string(r.Source), "why", r.Detail)
		}
		t.last, t.logged, t.first = r.Source, true, time.Time{}
		return "", true
	}
	if t.first.IsZero() {
		t.first = now
	}
	// Since boot; since this agent first looked if the uptime is unknown
	// or the agent was started later than the wait.
	waited := max(r.Uptime, now.Sub(t.first))
	if waited >= a.opts.ClockSyncWait || r.Client == "" {
		if !t.logged || t.last != clocksync.None {
			a.log.Warn("the clock is not synchronised and no real-time clock agrees with it; using it as it is (it is past this build's time)",
				"why", r.Detail, "waited", waited.Round(time.Second), "ntp_client", r.Client, "hint", "give the gateway an NTP client that reaches a server (systemd-timesyncd) or a battery-backed RTC")
		}
		t.last, t.logged = clocksync.None, true
		return "", true
	}
	return fmt.Sprintf("clock says %s: %s; waiting up to %s more for NTP before judging certificates",
		now.UTC().Format(time.RFC3339), r.Detail, (a.opts.ClockSyncWait - waited).Round(time.Second)), false
}
