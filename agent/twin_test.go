package agent_test

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// A twin synchronisation that fails is retried; the failing request is
// named in the log.
func TestTwinSyncRetried(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-twin-retry", symmetric: true})
	if _, err := d.provision(); err != nil {
		t.Fatal(err)
	}
	// The next two hub requests (the twin read, then its retry) fail.
	if st := az.Admin("POST", "/faults", map[string]any{"target": "hub", "status": 500, "count": 2}, nil); st >= 300 {
		t.Fatalf("arm fault: %d", st)
	}
	r := d.start()
	var tw struct {
		Reported map[string]any `json:"reported"`
	}
	testenv.Eventually(t, 30*time.Second, "the certificate reported after the failures", func() bool {
		az.Admin("GET", "/hub/devices/gw-twin-retry/twin", nil, &tw)
		_, ok := tw.Reported["certificate"]
		return ok
	})
	if n := strings.Count(r.log.String(), "twin read (GET): hub answered 500"); n != 2 {
		t.Fatalf("want two failed twin reads named in the log, got %d:\n%s", n, r.log.String())
	}
}

// agentGoroutines counts goroutines running the agent's code: the agent
// package, its parts (agent/..., telemetry, renewal) and the libraries it
// calls, but not azsim's or the test's own.
func agentGoroutines() (int, string) {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "github.com/gwagent/gwagent/") && !strings.Contains(g, "agent_test.") &&
			!strings.Contains(g, "gwagent/gwagent/azsim") && !strings.Contains(g, "gwagent/gwagent/devtools") {
			n++
			found = append(found, g)
		}
	}
	return n, strings.Join(found, "\n\n")
}

// Every goroutine the agent starts (twin sync, renewal loop, drain,
// callbacks) has ended when Run returns, even when stopped in the middle of
// a twin retry.
func TestRunLeavesNoGoroutines(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-goroutines", symmetric: true})
	if _, err := d.provision(); err != nil {
		t.Fatal(err)
	}
	before, _ := agentGoroutines()
	az.Admin("POST", "/faults", map[string]any{"target": "hub", "status": 503, "retryAfter": 60, "count": 1}, nil)
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "a twin retry planned", func() bool {
		return strings.Contains(r.log.String(), "twin synchronisation failed; retrying")
	})
	r.stop()
	if after, stacks := agentGoroutines(); after > before {
		t.Fatalf("%d agent goroutines still running after Run returned (%d before):\n%s", after-before, before, stacks)
	}
}

// Each twin request has its own deadline (Options.TwinTimeout), named in
// the error. azsim's twin-delay fault makes the hub slow.
func TestTwinRequestDeadlines(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	// run provisions regID, holds the hub's next count twin answers for
	// delay seconds, and runs the agent with each twin request bounded by
	// timeout until the sync's last request (the telemetryInterval report,
	// sent once the hub answered the certificate report) is in the twin.
	run := func(t *testing.T, regID string, delay, count int, timeout time.Duration) string {
		d := newDevice(t, az, devOpts{regID: regID, symmetric: true})
		if _, err := d.provision(); err != nil {
			t.Fatal(err)
		}
		if st := az.Admin("POST", "/faults/twin-delay", map[string]any{"seconds": delay, "count": count}, nil); st >= 300 {
			t.Fatalf("arm twin-delay: %d", st)
		}
		d.tweak = func(o *agent.Options) { o.TwinTimeout = timeout }
		r := d.start()
		testenv.Eventually(t, 60*time.Second, "the twin sync finished", func() bool {
			var tw struct {
				Reported map[string]any `json:"reported"`
			}
			az.Admin("GET", "/hub/devices/"+regID+"/twin", nil, &tw)
			_, ok := tw.Reported["telemetryInterval"]
			return ok
		})
		return r.log.String()
	}
	t.Run("a slow read does not eat the report's budget", func(t *testing.T) {
		// The read and the report after it each take 2 s of a 3.5 s
		// deadline: under one deadline for the whole sync the report would
		// time out after 1.5 s.
		if logs := run(t, "gw-twin-slow", 2, 2, 3500*time.Millisecond); strings.Contains(logs, "twin synchronisation failed") {
			t.Fatalf("a twin request timed out although each took less than its deadline:\n%s", logs)
		}
	})
	t.Run("a read past its deadline is named and retried", func(t *testing.T) {
		logs := run(t, "gw-twin-stuck", 30, 1, time.Second)
		if !strings.Contains(logs, "twin read (GET)") || !strings.Contains(logs, "deadline exceeded") {
			t.Fatalf("want the timed-out request named in the log:\n%s", logs)
		}
		if strings.Contains(logs, "PATCH reported): context deadline exceeded") {
			t.Fatalf("the report after the slow read timed out:\n%s", logs)
		}
	})
}

// A desired-properties update is reported back within the twin deadline
// even when the hub is slow to answer the report, and other messages from
// the hub (a direct method) are handled while the desired-properties
// callback waits for that answer: paho delivers each message on a
// goroutine of its own (SetOrderMatters(false)), so the callback blocking
// on the PATCH does not block the answer it waits for, nor anything else.
func TestDesiredUpdateWhileTwinSlow(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	const id = "gw-twin-desired"
	d := newDevice(t, az, devOpts{regID: id, symmetric: true})
	if _, err := d.provision(); err != nil {
		t.Fatal(err)
	}
	d.tweak = func(o *agent.Options) { o.TwinTimeout = 40 * time.Second }
	r := d.start()
	reported := func() map[string]any {
		var tw struct {
			Reported map[string]any `json:"reported"`
		}
		az.Admin("GET", "/hub/devices/"+id+"/twin", nil, &tw)
		ti, _ := tw.Reported["telemetryInterval"].(map[string]any)
		return ti
	}
	// Wait for the sync's end (its last answer in), not just its last
	// report (which the hub applies before answering).
	testenv.Eventually(t, 20*time.Second, "the first twin sync", func() bool {
		return strings.Contains(r.log.String(), "twin synchronised")
	})

	// The hub holds its answer to the next twin request (the report of
	// the new interval) for 3 s, well inside the 40 s deadline.
	if st := az.Admin("POST", "/faults/twin-delay", map[string]any{"seconds": 3, "count": 1}, nil); st >= 300 {
		t.Fatalf("arm twin-delay: %d", st)
	}
	var ver struct {
		Version int64 `json:"$version"`
	}
	if st := az.Admin("PATCH", "/hub/devices/"+id+"/twin/desired", map[string]any{"telemetryInterval": 7}, &ver); st >= 300 {
		t.Fatalf("patch desired: %d", st)
	}
	// The hub has the report (it applies it before the held answer), so
	// the callback now waits for the answer.
	testenv.Eventually(t, 20*time.Second, "the new interval reported", func() bool {
		ti := reported()
		return ti["value"] == float64(7) && ti["av"] == float64(ver.Version)
	})
	done := func() bool {
		return strings.Contains(r.log.String(), fmt.Sprintf("desired properties applied and reported\" version=%d", ver.Version))
	}
	// Meanwhile a direct method is answered.
	var res struct {
		Status  int            `json:"status"`
		Payload map[string]any `json:"payload"`
	}
	if st := az.Admin("POST", "/hub/devices/"+id+"/methods/ping?timeout=30", map[string]any{}, &res); st != 200 || res.Status != 200 {
		t.Fatalf("ping while the twin report waits: http %d, method status %d", st, res.Status)
	}
	if done() {
		t.Fatal("the desired-properties callback finished before the ping was answered; the test proves nothing (twin delay too short?)")
	}
	testenv.Eventually(t, 60*time.Second, "the desired-properties callback done", done)
	if strings.Contains(r.log.String(), "twin report failed") {
		t.Fatalf("the report waited for its deadline instead of its answer:\n%s", r.log.String())
	}
}

// pahoCallbacksInTwin counts the goroutines paho started to deliver a
// message that are running (or waiting in) gwagent's desired-properties
// handling or a twin report (tests in parallel have other callbacks of
// their own).
func pahoCallbacksInTwin() (int, string) {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "(*router).matchAndDispatch") && strings.Contains(g, "created by github.com/eclipse/paho") &&
			strings.Contains(g, "github.com/gwagent/gwagent/") &&
			(strings.Contains(g, "nDesired") || strings.Contains(g, "PatchReported")) {
			found = append(found, g)
		}
	}
	return len(found), strings.Join(found, "\n\n")
}

// The hub's callbacks into the agent never block paho's goroutines (the
// design's rule for handlers; #21 item 14): a desired-properties update is
// applied at once and reported by a goroutine the agent owns. So while the
// hub holds its answer to that report, no paho callback waits in gwagent's
// code, a direct method and a cloud-to-device message are handled at once,
// and a burst of ten updates meanwhile costs one more report to the hub
// (the newest state, in version order), not a report each: every report is
// a twin operation the hub throttles and meters.
func TestDesiredBurstWhileHubSlow(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	const id = "gw-twin-burst"
	d := newDevice(t, az, devOpts{regID: id, symmetric: true})
	if _, err := d.provision(); err != nil {
		t.Fatal(err)
	}
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "the first twin sync", func() bool {
		return strings.Contains(r.log.String(), "twin synchronised")
	})
	reported := func() (version int64, value, av any) {
		var tw struct {
			Reported map[string]any `json:"reported"`
		}
		az.Admin("GET", "/hub/devices/"+id+"/twin", nil, &tw)
		ti, _ := tw.Reported["telemetryInterval"].(map[string]any)
		v, _ := tw.Reported["$version"].(float64)
		return int64(v), ti["value"], ti["av"]
	}
	desired := func(seconds int) float64 {
		var ver struct {
			Version int64 `json:"$version"`
		}
		if st := az.Admin("PATCH", "/hub/devices/"+id+"/twin/desired", map[string]any{"telemetryInterval": seconds}, &ver); st >= 300 {
			t.Fatalf("patch desired: %d", st)
		}
		return float64(ver.Version)
	}
	before, _, _ := reported()

	// The hub holds its answer to the next twin request (the report of the
	// new interval) for 4 s.
	if st := az.Admin("POST", "/faults/twin-delay", map[string]any{"seconds": 4, "count": 1}, nil); st >= 300 {
		t.Fatalf("arm twin-delay: %d", st)
	}
	first := desired(2)
	testenv.Eventually(t, 5*time.Second, "the report of the first update at the hub, its answer held", func() bool {
		_, value, av := reported()
		return value == float64(2) && av == first
	})
	if n, stacks := pahoCallbacksInTwin(); n > 0 {
		t.Errorf("%d of paho's message goroutines wait in gwagent's code while the hub holds a twin answer:\n%s", n, stacks)
	}
	var last float64
	for s := 3; s <= 12; s++ {
		last = desired(s)
	}
	began := time.Now()
	var res struct {
		Status int `json:"status"`
	}
	if st := az.Admin("POST", "/hub/devices/"+id+"/methods/ping?timeout=10", map[string]any{}, &res); st != 200 || res.Status != 200 {
		t.Fatalf("ping while the twin report waits: http %d, method status %d", st, res.Status)
	}
	if st := az.Admin("POST", "/hub/devices/"+id+"/c2d", map[string]any{"hello": 1}, nil); st >= 300 {
		t.Fatalf("c2d: %d", st)
	}
	testenv.Eventually(t, 3*time.Second, "the cloud-to-device message handled", func() bool {
		return strings.Contains(r.log.String(), "cloud-to-device message")
	})
	if took := time.Since(began); took > 3*time.Second {
		t.Errorf("a method and a C2D message took %s while a twin report waited", took.Round(time.Millisecond))
	}
	testenv.Eventually(t, 20*time.Second, "the newest interval reported", func() bool {
		_, value, av := reported()
		return value == float64(12) && av == last
	})
	time.Sleep(500 * time.Millisecond) // reports still on their way would show now
	after, value, av := reported()
	if value != float64(12) || av != last {
		t.Fatalf("reported interval %v (av %v) at the end, want 12 (av %v): an older report overtook the newest", value, av, last)
	}
	if n := after - before; n > 3 {
		t.Fatalf("%d reports for 11 desired updates while the hub was slow; want the one in flight and one with the newest state", n)
	}
}
