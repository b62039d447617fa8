package telemetry_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/telemetry"
	"github.com/gwagent/gwagent/telemetry/outbox"
)

// These tests drive the drain with the fake hub of drain_test.go: the
// exact latency of each PUBACK on a fake clock, and a connection lost at
// an exact point, are what azsim cannot produce on demand. The agent's
// end-to-end tests (agent/economics_e2e_test.go) run the same behaviour
// against azsim's throttle and quota.

// queueApp queues n application messages (with properties app) in one go.
func queueApp(t *testing.T, r *rig, n int, app map[string]string, body func(i int) string) {
	t.Helper()
	msgs := make([]*outbox.Message, n)
	for i := range msgs {
		msgs[i] = &outbox.Message{Kind: outbox.KindApp, Body: []byte(body(i)), App: app,
			System: map[string]string{"ct": "application/json", "ce": "utf-8"}}
	}
	if err := r.p.Enqueue(msgs...); err != nil {
		t.Fatal(err)
	}
}

func numbered(i int) string { return fmt.Sprintf(`{"n":%d}`, i) }

func paced(rate float64) func() telemetry.Sending {
	return func() telemetry.Sending { return telemetry.Sending{MaxRate: rate} }
}

// settle lets the drain do what it can at this fake time.
func settle() { time.Sleep(3 * time.Millisecond) }

// pacedRig is a pipeline with n messages queued and a send budget of
// rate, on a fake clock started at t0.
func pacedRig(t *testing.T, rate float64, n int) (r *rig, clk *clock.Fake, t0 time.Time) {
	t.Helper()
	t0 = time.Now()
	clk = clock.NewFake(t0)
	r = newRig(t, rigOpts{clock: clk, sending: paced(rate)})
	queueApp(t, r, n, nil, numbered)
	return r, clk, t0
}

// pacedBacklog drains n queued messages at rate into a hub that
// acknowledges at once, on a fake clock started at t0, and waits for the
// first second's burst.
func pacedBacklog(t *testing.T, rate float64, n int) (r *rig, clk *clock.Fake, t0 time.Time, h *fakeHub) {
	t.Helper()
	r, clk, t0 = pacedRig(t, rate, n)
	h = newFakeHub(1 << 30)
	r.drain(h)
	testenv.Eventually(t, 10*time.Second, "the first second's burst", func() bool { return len(h.published()) == int(rate) })
	return r, clk, t0, h
}

// The drain never sends faster than the budget allows: at most one second
// of it at once, then the budget per second, on the pipeline's clock; and
// it does send at that rate.
func TestDrainPacedToBudget(t *testing.T) {
	r, clk, t0, h := pacedBacklog(t, 20, 200)
	for clk.Now().Sub(t0) < 10*time.Second {
		clk.Advance(50 * time.Millisecond)
		settle()
		el := clk.Now().Sub(t0).Seconds()
		if n := len(h.published()); float64(n) > 20+20*el+1e-9 {
			t.Fatalf("%d messages published %.2f s after the start at 20/s: more than 20 + 20/s", n, el)
		}
	}
	testenv.Eventually(t, 10*time.Second, "all 200 after 9 s at 20/s", func() bool { return len(h.published()) == 200 })
	if st := r.p.Stats(); st.SendRate != 20 || st.SendBudget != 20 {
		t.Fatalf("stats rate %g of %g, want 20 of 20", st.SendRate, st.SendBudget)
	}
}

// A health message queued behind a backlog goes next, not after it, and
// takes its token like any message.
func TestHealthAheadOfBacklog(t *testing.T) {
	r, clk, t0, h := pacedBacklog(t, 10, 100)
	if err := r.p.Enqueue(&outbox.Message{Kind: outbox.KindHealth, Body: []byte(`{"health":1}`), App: map[string]string{"type": "health"}}); err != nil {
		t.Fatal(err)
	}
	clk.Advance(100 * time.Millisecond)
	testenv.Eventually(t, 10*time.Second, "one more publish", func() bool { return len(h.published()) == 11 })
	settle()
	got := h.published()
	if len(got) != 11 || string(got[10].body) != `{"health":1}` {
		t.Fatalf("after the health message was queued behind 90 messages, publish #11 is %s (of %d): want the health message, within the budget", got[len(got)-1].body, len(got))
	}
	for clk.Now().Sub(t0) < 11*time.Second {
		clk.Advance(100 * time.Millisecond)
		settle()
	}
	testenv.Eventually(t, 10*time.Second, "all 101", func() bool { return len(h.published()) == 101 && r.depth() == 0 })
	for i, p := range h.published() {
		if i != 10 && string(p.body) == `{"health":1}` {
			t.Fatalf("the health message was sent twice (again at %d)", i)
		}
	}
}

// PUBACKs that come late (the hub holds messages: traffic shaping) halve
// the rate and raise telemetry-throttled; quick PUBACKs bring it back to
// the budget and clear it.
func TestDrainSlowsOnSlowPubacks(t *testing.T) {
	r, clk, _ := pacedRig(t, 100, 3000)
	h := newFakeHub(0)
	r.drain(h)
	ackAll := func() { h.ack(len(h.published())) }
	// Quick PUBACKs for a while: the baseline.
	for range 10 {
		settle()
		ackAll()
		clk.Advance(100 * time.Millisecond)
	}
	settle()
	ackAll()
	if r.sink.Has(telemetry.CondSendSlowed) {
		t.Fatal("telemetry-throttled raised with quick PUBACKs")
	}
	// The hub holds the next ones for 2 s.
	clk.Advance(100 * time.Millisecond)
	settle()
	clk.Advance(2 * time.Second)
	settle()
	ackAll()
	testenv.Eventually(t, 5*time.Second, "the rate halved", func() bool { return r.p.Stats().SendRate == 50 })
	reason, ok := r.sink.reason(telemetry.CondSendSlowed)
	if !ok || !strings.Contains(reason, "traffic shaping") || !strings.Contains(reason, "below the 100 messages/s budget") {
		t.Fatalf("condition %v %q: want telemetry-throttled saying what was seen and the rate", ok, reason)
	}
	// Quick again: back to 100 within about 5 s of quick PUBACKs.
	for i := 0; i < 100 && r.sink.Has(telemetry.CondSendSlowed); i++ {
		clk.Advance(100 * time.Millisecond)
		settle()
		ackAll()
		settle()
	}
	if r.sink.Has(telemetry.CondSendSlowed) || r.p.Stats().SendRate != 100 {
		t.Fatalf("after 10 s of quick PUBACKs: rate %g, condition still %v", r.p.Stats().SendRate, r.sink.Has(telemetry.CondSendSlowed))
	}
}

// A connection the hub closes after slowing PUBACKs (throttling) halves
// the rate again, and the next session starts at that rate.
func TestThrottledCloseSlowsNextSession(t *testing.T) {
	r, clk, _ := pacedRig(t, 100, 500)
	first := newFactsHub(0)
	ended := make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), first) }()
	settle()
	first.ack(len(first.published()))
	clk.Advance(100 * time.Millisecond)
	settle()
	clk.Advance(3 * time.Second)
	settle()
	first.ack(len(first.published())) // 3 s late: cut to 50
	testenv.Eventually(t, 5*time.Second, "the cut", func() bool { return r.p.Stats().SendRate == 50 })
	settle()
	first.lose()
	<-ended
	if st := r.p.Stats(); st.SendRate != 25 {
		t.Fatalf("rate %g after the hub closed the connection following slow PUBACKs, want 25", st.SendRate)
	}
	if reason, _ := r.sink.reason(telemetry.CondSendSlowed); !strings.Contains(reason, "closed the connection after slowing PUBACKs") {
		t.Fatalf("condition reason %q", reason)
	}
	if r.sink.Has(telemetry.CondHubQuota) {
		t.Fatal("throttling taken for the quota")
	}
	clk.Advance(2 * time.Second) // the bucket fills up: one second's worth
	second := newFakeHub(1 << 30)
	r.drain(second)
	testenv.Eventually(t, 10*time.Second, "the next session's first second", func() bool { return len(second.published()) == 25 })
	settle()
	if n := len(second.published()); n != 25 {
		t.Fatalf("the next session sent %d at once, want 25 (one second at the halved rate)", n)
	}
	clk.Advance(time.Second)
	testenv.Eventually(t, 10*time.Second, "the next second", func() bool { return len(second.published()) >= 50 })
}

// factsHub is the fake hub with what *transport.Session tells of its
// connection: whether it ended, and what was asked and answered on it.
type factsHub struct {
	*fakeHub
	done chan struct{}
}

func newFactsHub(acked int) *factsHub { return &factsHub{newFakeHub(acked), make(chan struct{})} }

func (h *factsHub) Done() <-chan struct{} { return h.done }

func (h *factsHub) Requests() (sent, answered int64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return int64(len(h.sent)), int64(min(h.acked, len(h.sent)))
}

func (h *factsHub) lose() { close(h.done); h.fakeHub.lose() }

// A connection the hub closes right after the first message with nothing
// acknowledged (what it does over its daily quota) makes the next one a
// probe on the usual schedule; a second in a row raises
// hub-quota-exceeded and holds connections back 10 to 15 minutes; twin
// and renewal wait (HubTakes); the next session sends one message and
// waits for its PUBACK; that PUBACK clears it all and the drain goes on.
// A connection lost after PUBACKs (the quota used up mid-drain) is not
// such a refusal.
func TestQuotaRefusalHoldsBack(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC)
	clk := clock.NewFake(t0)
	r := newRig(t, rigOpts{clock: clk})
	queueApp(t, r, 50, nil, numbered)

	mid := newFactsHub(10)
	ended := make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), mid) }()
	testenv.Eventually(t, 10*time.Second, "10 acknowledged", func() bool { return r.depth() == 40 })
	mid.lose()
	<-ended
	if r.sink.Has(telemetry.CondHubQuota) || !r.p.ConnectAfter().IsZero() {
		t.Fatal("a connection lost after PUBACKs taken for a refusal")
	}

	refused := newFactsHub(0)
	ended = make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), refused) }()
	testenv.Eventually(t, 10*time.Second, "published", func() bool { return len(refused.published()) > 0 })
	refused.lose()
	<-ended
	if r.sink.Has(telemetry.CondHubQuota) || !r.p.ConnectAfter().IsZero() {
		t.Fatal("one refused connection (or a link that failed right after the first message) held connections back")
	}
	clk.Advance(5 * time.Second)
	t0 = clk.Now()
	again := newFactsHub(0)
	ended = make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), again) }()
	testenv.Eventually(t, 10*time.Second, "the probe after one refusal", func() bool { return len(again.published()) > 0 })
	time.Sleep(50 * time.Millisecond)
	if n := len(again.published()); n != 1 {
		t.Fatalf("the session after a refused one sent %d messages before any PUBACK, want 1", n)
	}
	again.lose()
	<-ended
	reason, ok := r.sink.reason(telemetry.CondHubQuota)
	if !ok || !strings.Contains(reason, "right after the first telemetry message") || !strings.Contains(reason, "40 message(s) wait") {
		t.Fatalf("condition %v %q", ok, reason)
	}
	if at := r.p.ConnectAfter(); at.Sub(t0) < 10*time.Minute || at.Sub(t0) >= 15*time.Minute {
		t.Fatalf("next connection at %v, want 10 to 15 min after the refused one", at.Sub(t0))
	}
	if st := r.p.Stats().Quota; st.Refusals != 2 || st.Since.IsZero() || st.NextProbe.IsZero() {
		t.Fatalf("stats %+v", st)
	}
	var twinWent atomic.Bool
	twinCtx, stopTwin := context.WithCancel(context.Background())
	defer stopTwin()
	twinDone := make(chan struct{})
	go func() { defer close(twinDone); twinWent.Store(r.p.HubTakes(twinCtx)) }()

	clk.Advance(15 * time.Minute)
	probe := newFactsHub(0)
	r.drain(probe)
	testenv.Eventually(t, 10*time.Second, "the probe", func() bool { return len(probe.published()) == 1 })
	time.Sleep(50 * time.Millisecond)
	if n := len(probe.published()); n != 1 {
		t.Fatalf("the probe session sent %d messages before any PUBACK, want 1", n)
	}
	if twinWent.Load() {
		t.Fatal("the twin went ahead of the probe")
	}
	probe.ack(1 << 30)
	testenv.Eventually(t, 10*time.Second, "the rest after the probe's PUBACK", func() bool { return r.depth() == 0 })
	<-twinDone
	if !twinWent.Load() || r.sink.Has(telemetry.CondHubQuota) || !r.p.ConnectAfter().IsZero() {
		t.Fatal("a PUBACK did not clear the refusal")
	}
}

// Packing: consecutive JSON application messages with the same properties
// travel as one JSON array within PackBytes as the hub meters it; never
// mixing properties, never splitting a message, in order; a lone message
// goes as itself.
func TestPackedPublishes(t *testing.T) {
	clk := clock.NewFake(time.Now())
	r := newRig(t, rigOpts{clock: clk, sending: func() telemetry.Sending {
		return telemetry.Sending{Pack: true, PackBytes: 1024, PackWait: time.Second}
	}})
	pad := strings.Repeat("x", 80)
	body := func(i int) string { return fmt.Sprintf(`{"n":%d,"pad":%q}`, i, pad) }
	a, b := map[string]string{"site": "a"}, map[string]string{"site": "b"}
	queueApp(t, r, 30, a, body)
	queueApp(t, r, 5, b, func(i int) string { return body(30 + i) })
	queueApp(t, r, 1, a, func(int) string { return fmt.Sprintf(`{"n":35,"big":%q}`, strings.Repeat("y", 2000)) })
	queueApp(t, r, 1, b, func(int) string { return body(36) })
	queueApp(t, r, 10, a, func(i int) string { return body(37 + i) })
	h := newFakeHub(1 << 30)
	r.drain(h)
	testenv.Eventually(t, 10*time.Second, "all but the last pack", func() bool { return r.depth() <= 10 })
	clk.Advance(time.Second) // the last pack waited PackWait for more
	testenv.Eventually(t, 10*time.Second, "all", func() bool { return r.depth() == 0 })
	next, ids := 0, map[string]bool{}
	for _, p := range h.published() {
		var nums []int
		props := p.app
		if n, ok := props[telemetry.PackedProperty]; ok {
			var arr []map[string]any
			if err := json.Unmarshal(p.body, &arr); err != nil {
				t.Fatalf("packed body %s: %v", p.body, err)
			}
			if strconv.Itoa(len(arr)) != n || len(arr) < 2 {
				t.Fatalf("%s = %s for %d members", telemetry.PackedProperty, n, len(arr))
			}
			mids := strings.Split(props[telemetry.PackedIDsProperty], ",")
			if len(mids) != len(arr) || !strings.HasPrefix(p.mid, "pack-") {
				t.Fatalf("ids %v for %d members, mid %s", mids, len(arr), p.mid)
			}
			for _, id := range mids {
				if ids[id] {
					t.Fatalf("id %s twice", id)
				}
				ids[id] = true
			}
			if size := meteredSize(p); size > 1024 {
				t.Fatalf("a packed message of %d bytes as the hub meters it, limit 1024", size)
			}
			for _, m := range arr {
				nums = append(nums, int(m["n"].(float64)))
			}
		} else {
			var m map[string]any
			json.Unmarshal(p.body, &m)
			nums = []int{int(m["n"].(float64))}
			ids[p.mid] = true
		}
		wantSite := "a"
		if nums[0] >= 30 && nums[0] < 35 || nums[0] == 36 {
			wantSite = "b"
		}
		for _, n := range nums {
			if n != next {
				t.Fatalf("message %d where %d was next: out of order or lost", n, next)
			}
			if site := "a"; n >= 30 && n < 35 || n == 36 {
				site = "b"
				if wantSite != site {
					t.Fatalf("message %d (site %s) in a publish of site %s: properties mixed", n, site, wantSite)
				}
			} else if wantSite != site {
				t.Fatalf("message %d (site %s) in a publish of site %s: properties mixed", n, site, wantSite)
			}
			next++
		}
		if props["site"] != wantSite || p.ct != "application/json" {
			t.Fatalf("publish of %v carries site=%s ct=%s", nums, props["site"], p.ct)
		}
	}
	if next != 47 || len(ids) != 47 {
		t.Fatalf("%d messages arrived with %d ids, want 47", next, len(ids))
	}
	if n := len(h.published()); n > 47/8+6 {
		t.Fatalf("%d publishes for 47 messages: packing did not pack", n)
	}
}

// meteredSize is the size IoT Hub meters for a publish (Learn, "Create
// and read IoT Hub messages").
func meteredSize(p published) int {
	n := len(p.body) + len(p.mid) + len(p.ct) + len(p.ce)
	for k, v := range p.app {
		n += len(k) + len(v)
	}
	return n
}

// A spool file carried in a packed message leaves the spool only after the
// PUBACK of that message; a connection lost before it leaves every member
// in the spool and the outbox, and the next session sends them again.
func TestPackedSpoolFilesLeaveAfterPuback(t *testing.T) {
	clk := clock.NewFake(time.Now().Add(time.Hour)) // spool files are long settled
	r := newRig(t, rigOpts{clock: clk, sending: func() telemetry.Sending {
		return telemetry.Sending{Pack: true, PackBytes: 4096}
	}})
	const n = 40
	for i := range n {
		testenv.SpoolPut(t, r.spool, fmt.Sprintf("r%03d.json", i), []byte(fmt.Sprintf(`{"reading":%d}`, i)))
	}
	testenv.Eventually(t, 10*time.Second, "all queued", func() bool { return r.depth() == n })
	first := newFakeHub(0)
	ended := make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), first) }()
	testenv.Eventually(t, 10*time.Second, "one packed publish", func() bool { return len(first.published()) == 1 })
	time.Sleep(50 * time.Millisecond)
	if m, _ := filepath.Glob(filepath.Join(r.spool, "*.json")); len(m) != n {
		t.Fatalf("%d spool files left before the PUBACK, want all %d", len(m), n)
	}
	first.lose()
	<-ended
	if r.depth() != n {
		t.Fatalf("outbox holds %d after the loss, want %d", r.depth(), n)
	}
	second := newFakeHub(1 << 30)
	r.drain(second)
	testenv.Eventually(t, 10*time.Second, "acknowledged and retired", func() bool {
		m, _ := filepath.Glob(filepath.Join(r.spool, "*.json"))
		return r.depth() == 0 && len(m) == 0
	})
	got := second.published()
	if len(got) != 1 || got[0].mid != first.published()[0].mid || got[0].app[telemetry.PackedProperty] != strconv.Itoa(n) {
		t.Fatalf("the next session sent %d publishes; want the same pack of %d again under the same id", len(got), n)
	}
	if _, err := os.Stat(r.spool); err != nil {
		t.Fatal(err)
	}
}

// twinRefusedHub is a session on which a twin request went unanswered and
// no telemetry was published: Requests counts the twin request.
type twinRefusedHub struct{ *factsHub }

func (h twinRefusedHub) Requests() (sent, answered int64) { return 1, 0 }

// A probe session with nothing queued to probe with lets the twin and the
// renewal go ahead (their first request is the probe) instead of holding
// them until the next health message; the suspicion stays, so a refusal
// of that request is the second in a row and holds connections back.
func TestProbeWithNothingQueued(t *testing.T) {
	clk := clock.NewFake(time.Date(2030, 1, 1, 9, 0, 0, 0, time.UTC))
	r := newRig(t, rigOpts{clock: clk})
	first := twinRefusedHub{newFactsHub(0)}
	ended := make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), first) }()
	first.lose()
	<-ended
	if !strings.Contains(r.log.String(), "right after a twin request") {
		t.Fatal("a session closed after an unanswered twin request was not taken for a refusal: the test shows nothing")
	}

	probe := twinRefusedHub{newFactsHub(0)}
	ended = make(chan struct{})
	go func() { defer close(ended); r.p.Drain(context.Background(), probe) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if !r.p.HubTakes(ctx) {
		t.Fatal("with nothing queued to probe with, the twin and the renewal were held back (until a health message comes)")
	}
	probe.lose()
	<-ended
	if !r.sink.Has(telemetry.CondHubQuota) || r.p.ConnectAfter().IsZero() {
		t.Fatal("the twin request that probed was refused too, and nothing is held back: a reconnect storm with an empty outbox")
	}
}
