package clock

import (
	"context"
	"sort"
	"sync"
	"time"
)

// Fake is a Clock that stands still until Advance moves it. Timers, tickers
// and AfterFuncs fire, in deadline order, when Advance passes their
// deadline; BlockUntil lets a test wait until the code under test has armed
// its timers, so that an Advance is never lost to a race with a goroutine
// that has not reached its wait yet.
//
// Fake lives beside Real (not in a test package) so that tests of several
// packages share one; it imports neither testing nor anything of gwagent's.
type Fake struct {
	mu      sync.Mutex
	now     time.Time
	timers  map[*fakeTimer]struct{}
	changed chan struct{} // closed and replaced whenever timers change
}

// NewFake returns a Fake clock reading start.
func NewFake(start time.Time) *Fake {
	return &Fake{now: start, timers: map[*fakeTimer]struct{}{}, changed: make(chan struct{})}
}

type fakeTimer struct {
	f        *Fake
	deadline time.Time
	period   time.Duration // tickers
	c        chan time.Time
	fn       func()
}

func (f *Fake) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *Fake) NewTimer(d time.Duration) (Timer, <-chan time.Time) {
	t := &fakeTimer{f: f, c: make(chan time.Time, 1)}
	f.arm(t, d)
	return t, t.c
}

func (f *Fake) NewTicker(d time.Duration) (Ticker, <-chan time.Time) {
	if d <= 0 {
		panic("clock: non-positive interval for NewTicker")
	}
	t := &fakeTimer{f: f, c: make(chan time.Time, 1), period: d}
	f.arm(t, d)
	return fakeTicker{t}, t.c
}

func (f *Fake) AfterFunc(d time.Duration, fn func()) Timer {
	t := &fakeTimer{f: f, fn: fn}
	f.arm(t, d)
	return t
}

// arm (re)schedules t d from now; a deadline already due fires at once, as
// a real timer of zero duration does.
func (f *Fake) arm(t *fakeTimer, d time.Duration) {
	f.mu.Lock()
	t.deadline = f.now.Add(d)
	f.timers[t] = struct{}{}
	f.signalLocked()
	due := d <= 0
	f.mu.Unlock()
	if due {
		f.Advance(0)
	}
}

func (f *Fake) signalLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// Advance moves the clock forward by d, firing every timer whose deadline
// it passes (in deadline order; a ticker fires once however many of its
// periods were skipped, as a real ticker drops ticks for a slow reader).
func (f *Fake) Advance(d time.Duration) {
	f.mu.Lock()
	target := f.now.Add(d)
	for {
		var due []*fakeTimer
		for t := range f.timers {
			if !t.deadline.After(target) {
				due = append(due, t)
			}
		}
		if len(due) == 0 {
			break
		}
		sort.Slice(due, func(i, j int) bool { return due[i].deadline.Before(due[j].deadline) })
		t := due[0]
		if t.deadline.After(f.now) {
			f.now = t.deadline
		}
		if t.period > 0 {
			// The next tick on the ticker's grid after target: the ticks
			// in between are dropped, as a real ticker drops them for a
			// reader that was away (computed, not stepped: a jump of
			// years over a one-second ticker must not take a billion turns).
			t.deadline = t.deadline.Add((target.Sub(t.deadline)/t.period + 1) * t.period)
		} else {
			delete(f.timers, t)
		}
		f.signalLocked()
		if t.fn != nil {
			go t.fn()
		} else {
			select {
			case t.c <- f.now:
			default:
			}
		}
	}
	if target.After(f.now) {
		f.now = target
	}
	f.mu.Unlock()
}

// AdvanceToNext moves the clock to the earliest armed deadline and fires
// what is due there; it returns how far it moved, and false if nothing is
// armed (the clock then stays where it is).
func (f *Fake) AdvanceToNext() (time.Duration, bool) {
	f.mu.Lock()
	var next time.Time
	for t := range f.timers {
		if next.IsZero() || t.deadline.Before(next) {
			next = t.deadline
		}
	}
	d := next.Sub(f.now)
	f.mu.Unlock()
	if next.IsZero() {
		return 0, false
	}
	if d < 0 {
		d = 0
	}
	f.Advance(d)
	return d, true
}

// Next is the earliest armed deadline, and false if nothing is armed.
func (f *Fake) Next() (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var next time.Time
	for t := range f.timers {
		if next.IsZero() || t.deadline.Before(next) {
			next = t.deadline
		}
	}
	return next, !next.IsZero()
}

// Set moves the clock to t (forward or back) without firing anything that
// a backward step makes due later; a forward step fires like Advance. For
// tests of a wall clock that jumps (NTP after boot, a clock stuck in 1970).
func (f *Fake) Set(t time.Time) {
	f.mu.Lock()
	d := t.Sub(f.now)
	if d < 0 {
		f.now = t
		f.mu.Unlock()
		return
	}
	f.mu.Unlock()
	f.Advance(d)
}

// Pending is the number of armed timers, tickers and AfterFuncs.
func (f *Fake) Pending() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.timers)
}

// BlockUntil waits until at least n timers are armed, or ctx ends.
func (f *Fake) BlockUntil(ctx context.Context, n int) error {
	for {
		f.mu.Lock()
		ok, ch := len(f.timers) >= n, f.changed
		f.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Stop disarms the timer; as with Go 1.23 timers, a value not yet received
// is discarded. It reports whether the timer was armed.
func (t *fakeTimer) Stop() bool {
	f := t.f
	f.mu.Lock()
	_, armed := f.timers[t]
	delete(f.timers, t)
	if armed {
		f.signalLocked()
	}
	t.drain()
	f.mu.Unlock()
	return armed
}

// Reset re-arms the timer d from now, discarding a value not yet received.
func (t *fakeTimer) Reset(d time.Duration) bool {
	f := t.f
	f.mu.Lock()
	_, armed := f.timers[t]
	t.drain()
	f.mu.Unlock()
	f.arm(t, d)
	return armed
}

func (t *fakeTimer) drain() {
	if t.c == nil {
		return
	}
	select {
	case <-t.c:
	default:
	}
}

type fakeTicker struct{ t *fakeTimer }

func (k fakeTicker) Stop() { k.t.Stop() }

func (k fakeTicker) Reset(d time.Duration) {
	if d <= 0 {
		panic("clock: non-positive interval for Ticker.Reset")
	}
	k.t.f.mu.Lock()
	k.t.period = d
	k.t.f.mu.Unlock()
	k.t.Reset(d)
}
