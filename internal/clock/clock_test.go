package clock

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

var epoch = time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)

func received(ch <-chan time.Time) (time.Time, bool) {
	select {
	case v := <-ch:
		return v, true
	default:
		return time.Time{}, false
	}
}

// drain counts the values waiting in ch.
func drain(ch <-chan time.Time) int {
	n := 0
	for {
		if _, ok := received(ch); !ok {
			return n
		}
		n++
	}
}

func TestFakeTimer(t *testing.T) {
	f := NewFake(epoch)
	_, ch := f.NewTimer(10 * time.Second)
	f.Advance(9 * time.Second)
	if _, ok := received(ch); ok {
		t.Fatal("fired before its deadline")
	}
	f.Advance(5 * time.Second)
	v, ok := received(ch)
	if !ok || !v.Equal(epoch.Add(10*time.Second)) {
		t.Fatalf("fired %v %v, want the deadline", v, ok)
	}
	if got := f.Now(); !got.Equal(epoch.Add(14 * time.Second)) {
		t.Fatalf("Now = %v after advancing 14 s", got)
	}
	if f.Pending() != 0 {
		t.Fatalf("a fired timer is still armed")
	}
}

func TestFakeStopResetDiscardStaleValue(t *testing.T) {
	f := NewFake(epoch)
	tm, ch := f.NewTimer(time.Second)
	f.Advance(time.Second) // fired, value waiting in the channel
	if tm.Stop() {
		t.Fatal("Stop of a fired timer reported it armed")
	}
	if _, ok := received(ch); ok {
		t.Fatal("a stale value was received after Stop")
	}
	tm.Reset(2 * time.Second)
	f.Advance(time.Second)
	if _, ok := received(ch); ok {
		t.Fatal("reset timer fired early")
	}
	f.Advance(time.Second)
	if _, ok := received(ch); !ok {
		t.Fatal("reset timer did not fire")
	}
}

func TestFakeTickerDropsSkippedTicks(t *testing.T) {
	f := NewFake(epoch)
	tk, ch := f.NewTicker(time.Second)
	f.Advance(10 * time.Second)
	n := drain(ch)
	if n != 1 {
		t.Fatalf("a 10 s jump delivered %d ticks, want 1 (the rest dropped)", n)
	}
	f.Advance(time.Second)
	if _, ok := received(ch); !ok {
		t.Fatal("no tick one period later")
	}
	tk.Stop()
	f.Advance(5 * time.Second)
	if _, ok := received(ch); ok {
		t.Fatal("a stopped ticker ticked")
	}
}

// A jump of years (a clock set by NTP after booting in 1970) over a ticker
// fires it once and keeps its grid, at once.
func TestFakeTickerLongJump(t *testing.T) {
	f := NewFake(time.Unix(42, 0))
	_, ch := f.NewTicker(time.Second)
	began := time.Now()
	f.Set(epoch)
	if took := time.Since(began); took > time.Second {
		t.Fatalf("a 56-year jump over a 1 s ticker took %v", took)
	}
	n := drain(ch)
	if n != 1 {
		t.Fatalf("%d ticks after the jump, want 1", n)
	}
	next, _ := f.Next()
	if want := epoch.Add(time.Second); !next.Equal(want) {
		t.Fatalf("next tick at %v, want %v (the grid from 42 s, after the jump)", next, want)
	}
}

func TestFakeAfterFuncOrderAndBlockUntil(t *testing.T) {
	f := NewFake(epoch)
	done := make(chan int, 2)
	f.AfterFunc(2*time.Second, func() { done <- 2 })
	f.AfterFunc(1*time.Second, func() { done <- 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.BlockUntil(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if d, ok := f.AdvanceToNext(); !ok || d != time.Second {
		t.Fatalf("AdvanceToNext = %v %v, want 1 s", d, ok)
	}
	if got := <-done; got != 1 {
		t.Fatalf("first AfterFunc = %d", got)
	}
	f.AdvanceToNext()
	if got := <-done; got != 2 {
		t.Fatalf("second AfterFunc = %d", got)
	}
	if _, ok := f.AdvanceToNext(); ok {
		t.Fatal("AdvanceToNext with nothing armed moved the clock")
	}
}

func TestBlockUntilWaitsForAGoroutine(t *testing.T) {
	f := NewFake(epoch)
	var woke atomic.Bool
	go func() {
		Sleep(context.Background(), f, time.Minute)
		woke.Store(true)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := f.BlockUntil(ctx, 1); err != nil {
		t.Fatal("the sleeping goroutine never armed its timer")
	}
	f.Advance(time.Minute)
	for i := 0; i < 500 && !woke.Load(); i++ {
		time.Sleep(time.Millisecond)
	}
	if !woke.Load() {
		t.Fatal("Sleep did not return after the clock passed its deadline")
	}
}

func TestSleepCancelled(t *testing.T) {
	f := NewFake(epoch)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Sleep(ctx, f, time.Hour); err != context.Canceled {
		t.Fatalf("Sleep on a cancelled context = %v", err)
	}
	if f.Pending() != 0 {
		t.Fatal("a cancelled Sleep left its timer armed")
	}
}

func TestSetBackwardFiresNothing(t *testing.T) {
	f := NewFake(epoch)
	_, ch := f.NewTimer(time.Second)
	f.Set(time.Unix(0, 0))
	if _, ok := received(ch); ok {
		t.Fatal("a backward step fired a timer")
	}
	if !f.Now().Equal(time.Unix(0, 0)) {
		t.Fatal("Set did not move the clock back")
	}
}

func TestOr(t *testing.T) {
	if _, ok := Or(nil).(Real); !ok {
		t.Fatal("Or(nil) is not Real")
	}
	f := NewFake(epoch)
	if Or(f) != Clock(f) {
		t.Fatal("Or(f) is not f")
	}
}

// A deadline on a Fake ends the context when the fake clock passes it, as
// context.DeadlineExceeded; cancelling first, or the parent ending, is
// context.Canceled; on Real it is context.WithDeadline.
func TestWithDeadline(t *testing.T) {
	f := NewFake(epoch)
	ctx, cancel := WithDeadline(context.Background(), f, epoch.Add(time.Hour))
	defer cancel()
	f.Advance(59 * time.Minute)
	if ctx.Err() != nil {
		t.Fatal("ended before its deadline")
	}
	f.Advance(time.Minute)
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("not ended at its deadline")
	}
	if ctx.Err() != context.DeadlineExceeded {
		t.Fatalf("Err %v, want context.DeadlineExceeded", ctx.Err())
	}

	parent, stop := context.WithCancel(context.Background())
	ctx, cancel = WithDeadline(parent, f, f.Now().Add(time.Hour))
	defer cancel()
	stop()
	<-ctx.Done()
	if ctx.Err() != context.Canceled {
		t.Fatalf("Err %v after the parent ended, want context.Canceled", ctx.Err())
	}
	before := f.Pending()
	ctx, cancel = WithDeadline(context.Background(), f, f.Now().Add(time.Hour))
	cancel()
	if ctx.Err() != context.Canceled || f.Pending() != before {
		t.Fatalf("Err %v after cancel (timers %d, %d before)", ctx.Err(), f.Pending(), before)
	}

	at := time.Now().Add(time.Hour)
	ctx, cancel = WithDeadline(context.Background(), Real{}, at)
	defer cancel()
	if d, ok := ctx.Deadline(); !ok || !d.Equal(at) {
		t.Fatalf("a Real deadline is not the context's: %v %v", d, ok)
	}
}
