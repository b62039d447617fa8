// Package retry is gwagent's one retry vocabulary, used by every loop that
// tries something again (hub reconnects, twin sync, renewal, the hub's
// certificate requests, the re-provisioning gate, DPS registration, polling
// and re-polling):
//
//   - a Policy: exponential backoff with full jitter between a floor and a
//     cap, so that a fleet spreads out instead of retrying in step;
//   - one classification: an error is retried unless it is permanent
//     (IsPermanent: wrapped with Permanent, certmagic's ErrNoRetry idea, or
//     an error type that says so itself with a Permanent() bool method);
//   - one way to read a server's retry-after: an error in the chain with a
//     RetryAfter() time.Duration method (DPS answers, the hub's twin and
//     certificate answers), clamped once here to [AfterMin, AfterMax];
//   - one rule to combine them (Policy.Wait): the wait is the longer of the
//     backoff for this attempt and the server's retry-after, so a retry
//     never comes before the server allows it and repeated failures still
//     back off;
//   - Loop.Do for the plain "try until it works" loops, waiting on an
//     injected clock.Clock so tests run on clock.Fake.
//
// A leaf: it imports only internal/clock and keeps no state of its own.
package retry

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
)

// Policy is an exponential backoff: attempt n (0-based) waits a random
// duration in [Min, min(Max, Min*2^n)] (full jitter, so a fleet spreads).
type Policy struct {
	Min, Max time.Duration
}

// Delay returns the backoff before retry attempt n (0-based), drawn from r
// (nil: the global source, safe for concurrent use).
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

// Wait is the wait before retry attempt n (0-based) after err: the longer
// of Delay(n) and the retry-after the server sent with err (After).
func (p Policy) Wait(n int, err error, r *rand.Rand) time.Duration {
	return max(p.Delay(n, r), After(err))
}

// AfterMin and AfterMax bound a server's retry-after: what it asks is
// honoured, but never below a second (a busy loop) nor above five minutes
// (a hint that would park the device for hours).
const (
	AfterMin = time.Second
	AfterMax = 5 * time.Minute
)

// After is the retry-after a server sent with err: the first error in err's
// chain with a RetryAfter() time.Duration method that returns more than
// zero, clamped to [AfterMin, AfterMax]. Zero when none asked.
func After(err error) time.Duration {
	var ra interface{ RetryAfter() time.Duration }
	for e := err; e != nil; {
		if errors.As(e, &ra) {
			if d := ra.RetryAfter(); d > 0 {
				return min(max(d, AfterMin), AfterMax)
			}
			// An answer without a hint may wrap one with: look further.
			e = errors.Unwrap(ra.(error))
			continue
		}
		break
	}
	return 0
}

// permanent marks an error that retrying cannot help.
type permanent struct{ err error }

func (p *permanent) Error() string { return p.err.Error() }
func (p *permanent) Unwrap() error { return p.err }

// Permanent marks err as not worth retrying: Loop.Do returns it at once
// and IsPermanent reports true. errors.Is and errors.As see through it.
// Permanent(nil) is nil.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return &permanent{err}
}

// IsPermanent reports whether retrying err cannot help: it, or an error in
// its chain, was marked with Permanent, or is of a type whose Permanent()
// method says so (a DPS 401, a hub certificate answer 400). Everything else
// (timeouts, lost connections, 429, 5xx) is worth another try.
func IsPermanent(err error) bool {
	var p *permanent
	if errors.As(err, &p) {
		return true
	}
	var self interface{ Permanent() bool }
	for e := err; e != nil; {
		if !errors.As(e, &self) {
			return false
		}
		if self.Permanent() {
			return true
		}
		e = errors.Unwrap(self.(error))
	}
	return false
}

// Loop tries an operation until it succeeds, fails permanently, or its
// context ends, waiting Policy.Wait between attempts on Clock.
type Loop struct {
	Policy Policy
	Clock  clock.Clock // nil: clock.Real
	Rand   *rand.Rand  // nil: the global source
	// OnRetry, if set, is told of each failure that will be retried: the
	// error, how many attempts failed so far (1 after the first) and the
	// wait before the next.
	OnRetry func(err error, failures int, wait time.Duration)
}

// Do calls op until it returns nil (Do returns nil) or a permanent error
// (returned as it is), or until ctx ends: then the result wraps ctx's
// error and names the last failure.
func (l Loop) Do(ctx context.Context, op func(ctx context.Context) error) error {
	c := clock.Or(l.Clock)
	for n := 0; ; n++ {
		err := op(ctx)
		switch {
		case err == nil:
			return nil
		case IsPermanent(err):
			return err
		case ctx.Err() != nil:
			return fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		}
		wait := l.Policy.Wait(n, err, l.Rand)
		if l.OnRetry != nil {
			l.OnRetry(err, n+1, wait)
		}
		if cerr := clock.Sleep(ctx, c, wait); cerr != nil {
			return fmt.Errorf("%w (last error: %v)", cerr, err)
		}
	}
}
