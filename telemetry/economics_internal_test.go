package telemetry

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// The probe schedule while the hub refuses messages: a first refused
// session holds nothing back (a link may have failed at that moment), the
// next connection is a probe on the usual schedule; from the second in a
// row, the next attempt 10 to 15 minutes after the refused one, drawn per
// device; one more shortly after 00:00 UTC (30 s to 5 min), when the quota
// resets; nothing held back once a message is acknowledged.
func TestQuotaProbeSchedule(t *testing.T) {
	t.Run("ok/a first refusal is tried again at once, as a probe", func(t *testing.T) {
		q := quotaWatch{rng: rand.New(rand.NewPCG(9, 9))}
		now := time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC)
		if _, hold := q.refused(now, now.Add(time.Second), "seen"); hold {
			t.Fatal("one refused session held connections back")
		}
		if !q.connectAfter().IsZero() || q.stats() != (QuotaStats{}) {
			t.Fatalf("one refused session: next connection at %v, stats %+v; want no hold, no condition", q.connectAfter(), q.stats())
		}
		if !q.suspected() {
			t.Fatal("the session after a refused one is not a probe")
		}
		st, hold := q.refused(now.Add(3*time.Second), now.Add(4*time.Second), "seen again")
		if !hold || st.Refusals != 2 || !st.Since.Equal(now.Add(time.Second)) || q.connectAfter().IsZero() {
			t.Fatalf("a second refusal in a row: hold %v, stats %+v", hold, st)
		}
	})
	t.Run("ok/regular probes 10 to 15 min apart, spread across devices", func(t *testing.T) {
		start := time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC)
		lo, hi := time.Hour, time.Duration(0)
		for seed := range uint64(500) {
			q := quotaWatch{rng: rand.New(rand.NewPCG(seed, 7))}
			q.refused(start.Add(-5*time.Second), start.Add(-4*time.Second), "seen")
			q.refused(start, start.Add(time.Second), "seen")
			d := q.connectAfter().Sub(start)
			if d < probeEvery || d >= probeEvery+probeJitter {
				t.Fatalf("seed %d: next probe %v after the refused attempt, want 10 to 15 min", seed, d)
			}
			lo, hi = min(lo, d), max(hi, d)
		}
		if hi-lo < 4*time.Minute {
			t.Fatalf("500 devices probe within %v of each other (%v to %v): the jitter does not spread a fleet", hi-lo, lo, hi)
		}
	})
	t.Run("ok/one probe shortly after 00:00 UTC, then every 10 min again", func(t *testing.T) {
		q := quotaWatch{rng: rand.New(rand.NewPCG(1, 2))}
		start := time.Date(2030, 1, 1, 23, 57, 0, 0, time.UTC)
		midnight := time.Date(2030, 1, 2, 0, 0, 0, 0, time.UTC)
		q.refused(start, start.Add(time.Second), "seen")
		q.refused(start.Add(5*time.Second), start.Add(6*time.Second), "seen")
		m := q.connectAfter()
		if m.Before(midnight.Add(midnightDelay)) || !m.Before(midnight.Add(midnightDelay+midnightJitter)) {
			t.Fatalf("after a refusal at 23:57 the next probe is at %s, want 00:00:30 to 00:05:00", m.Format(time.TimeOnly))
		}
		// The midnight probe is refused too (the gateway's clock runs
		// ahead of the hub's): the next is a regular one, not another
		// midnight probe the same night.
		st, _ := q.refused(m, m.Add(time.Second), "seen again")
		next := q.connectAfter()
		if d := next.Sub(m); d < probeEvery || d >= probeEvery+probeJitter {
			t.Fatalf("after the refused midnight probe the next is %v later, want 10 to 15 min", d)
		}
		if st.Refusals != 3 || !st.Since.Equal(start.Add(time.Second)) || st.Seen != "seen again" || !st.NextProbe.Equal(next) {
			t.Fatalf("stats %+v", st)
		}
		if !strings.Contains(st.reason(42), "42 message(s) wait in the outbox") || !strings.Contains(st.reason(42), "403002") {
			t.Fatalf("reason %q: say what waits and what it means", st.reason(42))
		}
	})
	t.Run("ok/a PUBACK ends it", func(t *testing.T) {
		q := quotaWatch{rng: rand.New(rand.NewPCG(3, 4))}
		now := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
		q.refused(now, now, "seen")
		waited := make(chan bool)
		go func() { waited <- q.waitCleared(context.Background()) }()
		select {
		case <-waited:
			t.Fatal("HubTakes returned while the hub refuses messages")
		case <-time.After(50 * time.Millisecond):
		}
		if !q.took() {
			t.Fatal("took did not end the refusal")
		}
		if !<-waited || !q.connectAfter().IsZero() || q.suspected() || q.stats() != (QuotaStats{}) {
			t.Fatal("still held back after a PUBACK")
		}
		if q.took() {
			t.Fatal("a second PUBACK reported the end again")
		}
	})
	t.Run("ok/refusals right after slow PUBACKs count as throttling three times, then as the quota", func(t *testing.T) {
		q := quotaWatch{rng: rand.New(rand.NewPCG(5, 6))}
		for i := range maxThrottleRefusals {
			if !q.refusedAfterSlow() {
				t.Fatalf("refusal %d after slow PUBACKs not taken for throttling", i+1)
			}
		}
		if q.refusedAfterSlow() {
			t.Fatal("a fourth refusal in a row still taken for throttling")
		}
		q.took()
		if !q.refusedAfterSlow() {
			t.Fatal("the count did not start again after a PUBACK")
		}
	})
}

// The pacer's rule: halve the rate when a PUBACK comes 500 ms later than
// the quickest (once per episode), halve it when the hub closes the
// connection after slowing down, never below the floor; add the budget
// per 10 s of quick PUBACKs; follow the budget on reload.
func TestPacerAIMD(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC)
	p := pacer{clock: clock.NewFake(t0)}
	p.setBudget(10)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	rate := func() float64 { r, _ := p.current(); return r }
	if slow, ev := p.acked(at(0), 40*time.Millisecond); slow || ev != paceSame || rate() != 10 {
		t.Fatalf("a quick PUBACK at full rate: slow %v, event %v, rate %g", slow, ev, rate())
	}
	if slow, _ := p.acked(at(time.Second), 400*time.Millisecond); slow {
		t.Fatal("360 ms above the quickest counted as slow")
	}
	if slow, ev := p.acked(at(2*time.Second), 2*time.Second); !slow || ev != paceCut || rate() != 5 {
		t.Fatalf("a PUBACK 2 s late: slow %v, event %v, rate %g; want a cut to 5", slow, ev, rate())
	}
	if _, ev := p.acked(at(3*time.Second), 2500*time.Millisecond); ev != paceSame || rate() != 5 {
		t.Fatalf("a second late PUBACK within the same episode cut again (rate %g)", rate())
	}
	if _, ev := p.acked(at(5*time.Second), 2500*time.Millisecond); ev != paceCut || rate() != 2.5 {
		t.Fatalf("a late PUBACK 3 s after the cut: rate %g, want 2.5", rate())
	}
	if !p.throttled(at(5500*time.Millisecond)) || rate() != 1.25 {
		t.Fatalf("a close after slow PUBACKs: rate %g, want 1.25", rate())
	}
	for i := range 10 {
		p.throttled(at(6*time.Second + time.Duration(i)*time.Second))
	}
	if rate() != paceFloor {
		t.Fatalf("after many cuts the rate is %g, want the floor %g", rate(), paceFloor)
	}
	// Quick PUBACKs: +1/s per second (the budget per 10 s), back to 10.
	now := 20 * time.Second
	var ev paceEvent
	for i := 0; i < 200 && ev != paceFull; i++ {
		now += 100 * time.Millisecond
		_, ev = p.acked(at(now), 40*time.Millisecond)
	}
	if ev != paceFull || rate() != 10 {
		t.Fatalf("quick PUBACKs did not bring the rate back to the budget: %g", rate())
	}
	if took := now - 20*time.Second; took < 9*time.Second || took > 11*time.Second {
		t.Fatalf("from the floor back to the budget in %v, want about 10 s", took)
	}
	// Reload: at the budget, the rate follows it; below it, it stays
	// where the hub put it, within the new budget.
	p.setBudget(20)
	if rate() != 20 {
		t.Fatalf("budget raised at full rate: rate %g, want 20", rate())
	}
	p.acked(at(now+time.Minute), 3*time.Second)
	p.setBudget(40)
	if rate() != 10 {
		t.Fatalf("budget raised while cut: rate %g, want 10 (kept)", rate())
	}
	p.setBudget(4)
	if rate() != 4 {
		t.Fatalf("budget lowered below the rate: rate %g, want 4", rate())
	}
	p.setBudget(0)
	if !p.take(context.Background(), func() float64 { return 0 }) {
		t.Fatal("unpaced take waited")
	}
}

// The token bucket: one second of the budget at once, then one token per
// 1/budget, on the pipeline's clock.
func TestPacerTokens(t *testing.T) {
	clk := clock.NewFake(time.Date(2030, 1, 1, 12, 0, 0, 0, time.UTC))
	p := pacer{clock: clk}
	budget := func() float64 { return 5 }
	for i := range 5 {
		if !p.take(context.Background(), budget) {
			t.Fatalf("token %d of the first second's burst", i)
		}
	}
	got := make(chan bool, 1)
	go func() { got <- p.take(context.Background(), budget) }()
	if err := clk.BlockUntil(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	select {
	case <-got:
		t.Fatal("a sixth token within the first second")
	case <-time.After(20 * time.Millisecond):
	}
	clk.Advance(200 * time.Millisecond)
	select {
	case ok := <-got:
		if !ok {
			t.Fatal("take failed")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no token 200 ms later at 5/s")
	}
	// A reload to unlimited frees a waiting drain within a second.
	var unlimited = make(chan struct{})
	go func() {
		got <- p.take(context.Background(), func() float64 {
			select {
			case <-unlimited:
				return 0
			default:
				return 0.05
			}
		})
	}()
	if err := clk.BlockUntil(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	close(unlimited)
	clk.Advance(time.Second)
	select {
	case <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("a reload to max_rate = 0 did not free the waiting drain")
	}
}

// The pack's size as the drain counts it while gathering is the size IoT
// Hub meters for the message it becomes, to the byte, so a pack of
// PackBytes costs exactly one chunk.
func TestPackSizeIsMetered(t *testing.T) {
	for _, bodyLen := range []int{9, 100, 999} {
		for _, app := range []map[string]string{nil, {"site": "north", "kind": "temp"}} {
			pk := packer{limit: 1 << 20}
			for i := range 120 {
				m := &outbox.Message{Kind: outbox.KindApp, ID: fmt.Sprintf("spool-%024x", i),
					System: map[string]string{"ct": "application/json", "ce": "utf-8"}, App: app,
					Body: []byte(fmt.Sprintf(`{"n":%d,"p":"%s"}`, i, strings.Repeat("x", bodyLen)))}
				pk.add(m, time.Time{})
				if len(pk.msgs) < 2 {
					continue
				}
				body, sys, papp := packed(pk.msgs)
				if want := meteredSize(len(body), sys, papp); pk.size != want {
					t.Fatalf("body %d, %d members: counted %d bytes, the hub meters %d", bodyLen, len(pk.msgs), pk.size, want)
				}
				var arr []json.RawMessage
				if err := json.Unmarshal(body, &arr); err != nil || len(arr) != len(pk.msgs) {
					t.Fatalf("body is not a JSON array of the %d members: %v", len(pk.msgs), err)
				}
			}
		}
	}
}
