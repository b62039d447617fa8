// Package backoff is gwagent's retry schedule: exponential with full jitter
// between a floor and a cap, and the clamp for server-sent retry-after. A
// leaf utility; it holds no global state (pass a *rand.Rand or nil).
package backoff

import (
	"math/rand/v2"
	"time"
)

// Policy is an exponential backoff: attempt n (0-based) waits a random
// duration in [Min, min(Max, Min*2^n)] (full jitter, so a fleet spreads).
type Policy struct {
	Min, Max time.Duration
}

// Delay returns the wait before retry attempt n.
func (p Policy) Delay(n int, r *rand.Rand) time.Duration {
	d := p.Min
	for i := 0; i < n && d < p.Max; i++ {
		d *= 2
	}
	if d > p.Max {
		d = p.Max
	}
	span := d - p.Min
	if span <= 0 {
		return p.Min
	}
	var j int64
	if r != nil {
		j = r.Int64N(int64(span) + 1)
	} else {
		j = rand.Int64N(int64(span) + 1)
	}
	return p.Min + time.Duration(j)
}

// Clamp bounds a server-sent retry-after to [lo, hi]; zero (absent) stays
// zero so the caller falls back to its own backoff.
func Clamp(d, lo, hi time.Duration) time.Duration {
	switch {
	case d <= 0:
		return 0
	case d < lo:
		return lo
	case d > hi:
		return hi
	}
	return d
}
