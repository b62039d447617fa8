// Package clock is the one source of time for gwagent's product code, in the
// shape of tailscale's tstime.Clock: Now, timers, tickers and AfterFunc behind
// an interface, so that schedules (renewal, settle, backoff, disk-full
// retries, the watchdog) can be driven by a Fake in tests instead of waiting
// on the wall clock.
//
// Product packages take a Clock (nil means Real) and never call time.Now,
// time.NewTimer, time.After or time.Sleep themselves; a test enforces that.
// A leaf: it imports nothing of gwagent's and keeps no package state.
package clock

import (
	"context"
	"time"
)

// Clock tells the time and makes timers. Real is the system clock; Fake is
// a clock that moves only when a test moves it.
type Clock interface {
	// Now is the current time.
	Now() time.Time
	// NewTimer is time.NewTimer: the channel receives the time once, d from now.
	NewTimer(d time.Duration) (Timer, <-chan time.Time)
	// NewTicker is time.NewTicker: the channel receives the time every d,
	// dropping ticks a slow reader missed.
	NewTicker(d time.Duration) (Ticker, <-chan time.Time)
	// AfterFunc is time.AfterFunc: f runs in its own goroutine d from now.
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is the part of *time.Timer that callers use. As with Go 1.23's
// timers, no stale value is received after Stop or Reset returns.
type Timer interface {
	Stop() bool
	Reset(d time.Duration) bool
}

// Ticker is the part of *time.Ticker that callers use.
type Ticker interface {
	Stop()
	Reset(d time.Duration)
}

// Or returns c, or Real if c is nil: the default for an optional Clock field.
func Or(c Clock) Clock {
	if c == nil {
		return Real{}
	}
	return c
}

// Sleep waits d on c, or until ctx ends; it returns ctx's error in that case.
// A d of zero or less returns at once (ctx permitting).
func Sleep(ctx context.Context, c Clock, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t, ch := c.NewTimer(d)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Until is how long until t on c (negative when t has passed).
func Until(c Clock, t time.Time) time.Duration { return t.Sub(c.Now()) }

// Since is how long since t on c.
func Since(c Clock, t time.Time) time.Duration { return c.Now().Sub(t) }

// Real is the system clock.
type Real struct{}

func (Real) Now() time.Time { return time.Now() }

func (Real) NewTimer(d time.Duration) (Timer, <-chan time.Time) {
	t := time.NewTimer(d)
	return t, t.C
}

func (Real) NewTicker(d time.Duration) (Ticker, <-chan time.Time) {
	t := time.NewTicker(d)
	return t, t.C
}

func (Real) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }
