package retry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
)

// hinted is a server answer with a retry-after, as DPS's and the hub's are.
type hinted struct {
	after time.Duration
	final bool
}

func (h *hinted) Error() string             { return fmt.Sprintf("server says retry after %s", h.after) }
func (h *hinted) RetryAfter() time.Duration { return h.after }
func (h *hinted) Permanent() bool           { return h.final }
func wrapped(err error) error               { return fmt.Errorf("op: %w", err) }
func rng() *rand.Rand                       { return rand.New(rand.NewPCG(1, 2)) }
func within(d, lo, hi time.Duration) bool   { return d >= lo && d <= hi }

func TestDelay(t *testing.T) {
	p := Policy{Min: time.Second, Max: 8 * time.Second}
	tests := []struct {
		name   string
		n      int
		lo, hi time.Duration
	}{
		{"ok/first retry waits the floor", 0, time.Second, time.Second},
		{"ok/second up to twice the floor", 1, time.Second, 2 * time.Second},
		{"ok/fourth up to eight times", 3, time.Second, 8 * time.Second},
		{"ok/capped", 30, time.Second, 8 * time.Second},
	}
	r := rng()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for range 200 {
				if d := p.Delay(tc.n, r); !within(d, tc.lo, tc.hi) {
					t.Fatalf("Delay(%d) = %s, want within [%s, %s]", tc.n, d, tc.lo, tc.hi)
				}
			}
		})
	}
	// Full jitter: the waits of a fleet spread over the whole span.
	var lo, hi int
	for range 1000 {
		d := p.Delay(3, r)
		if d < 3*time.Second {
			lo++
		}
		if d > 6*time.Second {
			hi++
		}
	}
	if lo < 150 || hi < 150 {
		t.Fatalf("fail/waits not spread over [1 s, 8 s]: %d below 3 s, %d above 6 s of 1000", lo, hi)
	}
}

func TestAfterAndWait(t *testing.T) {
	p := Policy{Min: time.Second, Max: time.Minute}
	tests := []struct {
		name   string
		err    error
		after  time.Duration
		n      int
		lo, hi time.Duration // of Wait(n)
	}{
		{"ok/no hint: the backoff", errors.New("timeout"), 0, 0, time.Second, time.Second},
		{"ok/nil error: the backoff", nil, 0, 1, time.Second, 2 * time.Second},
		{"ok/hint longer than the backoff wins", wrapped(&hinted{after: 7 * time.Second}), 7 * time.Second, 0, 7 * time.Second, 7 * time.Second},
		{"ok/backoff longer than the hint wins", &hinted{after: 2 * time.Second}, 2 * time.Second, 10, 2 * time.Second, time.Minute},
		{"ok/hint below a second is raised", &hinted{after: time.Millisecond}, time.Second, 0, time.Second, time.Second},
		{"ok/hint of hours is capped", &hinted{after: 3 * time.Hour}, AfterMax, 0, AfterMax, AfterMax},
		{"ok/an answer without a hint wrapping one with", fmt.Errorf("%w", &hintless{wrapped(&hinted{after: 4 * time.Second})}), 4 * time.Second, 0, 4 * time.Second, 4 * time.Second},
		{"ok/zero hint: none", &hinted{}, 0, 0, time.Second, time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := After(tc.err); got != tc.after {
				t.Fatalf("After = %s, want %s", got, tc.after)
			}
			if got := p.Wait(tc.n, tc.err, rng()); !within(got, tc.lo, tc.hi) {
				t.Fatalf("Wait(%d) = %s, want within [%s, %s]", tc.n, got, tc.lo, tc.hi)
			}
		})
	}
}

// hintless carries a RetryAfter method that has nothing to say, and wraps
// an error that has.
type hintless struct{ err error }

func (h *hintless) Error() string             { return "hintless: " + h.err.Error() }
func (h *hintless) Unwrap() error             { return h.err }
func (h *hintless) RetryAfter() time.Duration { return 0 }

func TestIsPermanent(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"ok/nil", nil, false},
		{"ok/plain error is retried", errors.New("connection reset"), false},
		{"ok/marked", Permanent(errors.New("bad config")), true},
		{"ok/marked deep in the chain", wrapped(wrapped(Permanent(io.EOF))), true},
		{"ok/type says final", wrapped(&hinted{final: true}), true},
		{"ok/type says retry", &hinted{after: time.Second}, false},
		{"ok/joined with a final one", errors.Join(io.EOF, Permanent(io.ErrUnexpectedEOF)), true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := IsPermanent(tc.err); got != tc.want {
				t.Fatalf("IsPermanent(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
	if Permanent(nil) != nil {
		t.Fatal("fail/Permanent(nil) is not nil")
	}
	if inner := io.EOF; !errors.Is(Permanent(inner), inner) || Permanent(inner).Error() != inner.Error() {
		t.Fatal("fail/Permanent hides the error it wraps")
	}
}

var epoch = time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)

// TestLoopDo drives Do on a fake clock: each case is the sequence of
// results op returns; the test checks Do's result, the number of calls and
// the waits on the clock between them.
func TestLoopDo(t *testing.T) {
	boom := errors.New("boom")
	final := errors.New("final")
	tests := []struct {
		name    string
		results []error // op's results in order; the last repeats
		cancel  int     // cancel the context after this many calls (0: never)
		want    error   // errors.Is target; nil: success
		calls   int
		waits   []time.Duration // exact, with Min == Max
	}{
		{"ok/first try", []error{nil}, 0, nil, 1, nil},
		{"ok/after two failures", []error{boom, boom, nil}, 0, nil, 3, []time.Duration{time.Second, time.Second}},
		{"ok/retry-after honoured", []error{&hinted{after: 9 * time.Second}, nil}, 0, nil, 2, []time.Duration{9 * time.Second}},
		{"fail/permanent at once", []error{boom, Permanent(final)}, 0, final, 2, []time.Duration{time.Second}},
		{"fail/type says final", []error{&hinted{after: time.Hour, final: true}}, 0, nil, 1, nil},
		{"fail/context ends", []error{boom}, 3, context.Canceled, 3, []time.Duration{time.Second, time.Second}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fc := clock.NewFake(epoch)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var waits []time.Duration
			calls := 0
			l := Loop{Policy: Policy{Min: time.Second, Max: time.Second}, Clock: fc,
				OnRetry: func(_ error, n int, d time.Duration) {
					if n != len(waits)+1 {
						t.Errorf("OnRetry failures = %d, want %d", n, len(waits)+1)
					}
					waits = append(waits, d)
				}}
			done := make(chan error, 1)
			go func() {
				done <- l.Do(ctx, func(context.Context) error {
					err := tc.results[min(calls, len(tc.results)-1)]
					calls++
					if tc.cancel > 0 && calls == tc.cancel {
						cancel()
					}
					return err
				})
			}()
			var err error
		drive:
			for {
				select {
				case err = <-done:
					break drive
				case <-time.After(time.Millisecond):
					fc.AdvanceToNext()
				}
			}
			switch {
			case tc.name == "fail/type says final":
				if !IsPermanent(err) {
					t.Fatalf("Do = %v, want the final answer", err)
				}
			case tc.want == nil && err != nil, tc.want != nil && !errors.Is(err, tc.want):
				t.Fatalf("Do = %v, want %v", err, tc.want)
			}
			if calls != tc.calls {
				t.Fatalf("op called %d times, want %d", calls, tc.calls)
			}
			if fmt.Sprint(waits) != fmt.Sprint(tc.waits) {
				t.Fatalf("waits %v, want %v", waits, tc.waits)
			}
			var slept time.Duration
			for _, w := range waits {
				slept += w
			}
			if got := fc.Now().Sub(epoch); tc.cancel == 0 && got != slept {
				t.Fatalf("the clock moved %s, want the waits' %s", got, slept)
			}
		})
	}
}

// The wait is on the injected clock: nothing happens until it moves.
func TestLoopWaitsOnTheClock(t *testing.T) {
	fc := clock.NewFake(epoch)
	calls := make(chan struct{}, 10)
	l := Loop{Policy: Policy{Min: time.Minute, Max: time.Minute}, Clock: fc}
	done := make(chan error, 1)
	n := 0
	go func() {
		done <- l.Do(context.Background(), func(context.Context) error {
			calls <- struct{}{}
			n++
			if n < 2 {
				return errors.New("again")
			}
			return nil
		})
	}()
	<-calls
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := fc.BlockUntil(ctx, 1); err != nil {
		t.Fatal("Do did not wait on the clock")
	}
	fc.Advance(59 * time.Second)
	select {
	case <-calls:
		t.Fatal("fail/retried before the minute passed")
	case <-time.After(50 * time.Millisecond):
	}
	fc.Advance(time.Second)
	<-calls
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
