package agent_test

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/internal/azsim"
	"github.com/gwagent/gwagent/internal/testenv"
)

// A twin synchronisation that fails is retried; the failing request is
// named in the log.
func TestTwinSyncRetried(t *testing.T) {
	az := testenv.StartAzsim(t, azsim.Config{})
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

// agentGoroutines counts goroutines running code of the agent package.
func agentGoroutines() (int, string) {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "gwagent/gwagent/agent.") && !strings.Contains(g, "agent_test.") {
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
	az := testenv.StartAzsim(t, azsim.Config{})
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
	az := testenv.StartAzsim(t, azsim.Config{})
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
		// The read and the report after it each take 6 s of a 10 s
		// deadline: under one deadline for the whole sync the report would
		// time out after 4 s.
		if logs := run(t, "gw-twin-slow", 6, 2, 10*time.Second); strings.Contains(logs, "twin synchronisation failed") {
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
