package renewal

import (
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/retry"
)

// TestReprovisionGate walks the rule with a fake clock: a quiet time after
// every registration that doubles while the hub keeps refusing, a reset by
// an accepted connection, and at most PerHour registrations in any hour.
func TestReprovisionGate(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	g := &gate{policy: ReprovisionPolicy{Backoff: retry.Policy{Min: time.Minute, Max: 16 * time.Minute}, PerHour: 4}.withDefaults()}
	// No jitter: the upper bound of each step.
	delay := func(n int) time.Duration {
		d := time.Minute << n
		return min(d, 16*time.Minute)
	}
	type step struct {
		name   string
		at     time.Duration // since t0
		action string        // "try" (allow, then record if allowed), "connected"
		want   bool
	}
	steps := []step{
		{"ok/first registration", 0, "try", true},
		{"fail/refused right after: sync lag, not a new identity", 30 * time.Second, "try", false},
		{"ok/after the quiet time", time.Minute, "try", true},
		{"fail/quiet time doubled", 2 * time.Minute, "try", false},
		{"ok/after 2 min", 3 * time.Minute, "try", true},
		{"fail/4 min now", 6 * time.Minute, "try", false},
		{"ok/after 4 min", 7 * time.Minute, "try", true},
		{"fail/hourly bound reached though the backoff allows", 20 * time.Minute, "try", false},
		{"fail/still within the hour of the first", 59 * time.Minute, "try", false},
		{"ok/an hour after the first", 60 * time.Minute, "try", true},
		{"ok/the hub accepted us", 61 * time.Minute, "connected", true},
		{"ok/refused after an accepted connection: at once", 61*time.Minute + 30*time.Second, "try", true},
		{"ok/after the quiet time", 64 * time.Minute, "try", true},
		{"fail/backoff over, hourly bound not", 66 * time.Minute, "try", false},
		{"ok/a slot frees up", 67 * time.Minute, "try", true},
	}
	for _, s := range steps {
		now := t0.Add(s.at)
		switch s.action {
		case "connected":
			g.connected()
		case "try":
			ok, next := g.allow(now)
			if ok != s.want {
				t.Fatalf("%s: allow at +%s = %v (next %s), want %v", s.name, s.at, ok, next.Sub(t0), s.want)
			}
			if !ok && !next.After(now) {
				t.Fatalf("%s: refused but next %s is not in the future", s.name, next.Sub(t0))
			}
			if ok {
				g.record(now, delay)
			}
		}
	}
}
