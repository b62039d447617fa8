package testenv

import (
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
)

// FakeTime drives a clock.Fake in an end-to-end test, where the code under
// test also does real I/O (TLS, MQTT, files) that no fake clock can see.
// Whenever the armed timers have stayed the same for a moment of wall time
// (the code has settled into its waits), it moves the clock to the earliest
// deadline, but never past the horizon the test allows. Waits the test
// does not care about (backoff, DPS's retry-after) so pass at once, and the
// events it does care about (a renewal at 80% of a certificate's lifetime)
// come when the test moves the horizon.
//
// Give the same clock to azsim (azsim.Config.Now) as to the agent: then
// certificates are issued, checked by the hub and judged by the agent in
// one time, as on a real device whose clock agrees with Azure's.
type FakeTime struct {
	*clock.Fake
	mu      sync.Mutex
	horizon time.Time
	passTo  time.Time // Pass's target: reached even where nothing is armed
	step    time.Duration
	stop    chan struct{}
	done    chan struct{}
}

// settle is how long the timers must stay the same before the clock moves.
const settle = 15 * time.Millisecond

// StartFakeTime starts a fake clock at start that moves to no deadline
// until the test allows it (Allow, AllowUntil); it stops with the test.
func StartFakeTime(t testing.TB, start time.Time) *FakeTime {
	f := &FakeTime{Fake: clock.NewFake(start), horizon: start, stop: make(chan struct{}), done: make(chan struct{})}
	go f.run()
	t.Cleanup(func() { close(f.stop); <-f.done })
	return f
}

// AllowUntil lets the clock move to deadlines up to t.
func (f *FakeTime) AllowUntil(t time.Time) {
	f.mu.Lock()
	f.horizon = t
	f.mu.Unlock()
}

// Allow lets the clock move to deadlines up to d from now.
func (f *FakeTime) Allow(d time.Duration) { f.AllowUntil(f.Now().Add(d)) }

// Pass lets the clock run d on from now and waits (up to 10 s of wall
// time) until it has: the code's timers up to there fire on the way, and
// where nothing is armed the clock moves on once the code has settled. For
// "the agent keeps trying for a while" without waiting that while.
func (f *FakeTime) Pass(t testing.TB, d time.Duration) {
	t.Helper()
	target := f.Now().Add(d)
	f.mu.Lock()
	if f.horizon.Before(target) {
		f.horizon = target
	}
	f.passTo = target
	f.mu.Unlock()
	Eventually(t, 10*time.Second, "the clock "+d.String()+" on", func() bool { return !f.Now().Before(target) })
}

// MaxStep bounds each move of the clock to d (0: none), so that it runs
// close to the pace of the code's real I/O (a certificate request the hub
// answers in milliseconds) instead of leaping past it; for tests that
// measure when things happened.
func (f *FakeTime) MaxStep(d time.Duration) {
	f.mu.Lock()
	f.step = d
	f.mu.Unlock()
}

// Jump moves the clock by d at once (firing what falls due), and the
// horizon with it if it was behind.
func (f *FakeTime) Jump(d time.Duration) {
	f.Advance(d)
	f.mu.Lock()
	if now := f.Now(); f.horizon.Before(now) {
		f.horizon = now
	}
	f.mu.Unlock()
}

func (f *FakeTime) run() {
	defer close(f.done)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var (
		last     time.Time
		lastN    int
		stableAt = time.Now()
	)
	for {
		select {
		case <-f.stop:
			return
		case <-tick.C:
		}
		next, ok := f.Next()
		n := f.Pending()
		if !next.Equal(last) || n != lastN {
			last, lastN, stableAt = next, n, time.Now()
			continue
		}
		f.mu.Lock()
		h, step, passTo := f.horizon, f.step, f.passTo
		f.mu.Unlock()
		if time.Since(stableAt) < settle {
			continue
		}
		if passTo.After(f.Now()) && (!ok || next.After(passTo)) {
			next, ok = passTo, true // nothing armed before Pass's target
		}
		if !ok || next.After(h) {
			continue
		}
		d := max(next.Sub(f.Now()), 0)
		if step > 0 {
			d = min(d, step)
		}
		f.Advance(d)
		stableAt = time.Now()
	}
}
