package agent_test

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// Options.Backlog (which gives the Go runtime a second processor in
// cmd/gwagent) is told when the drain starts on a backlog and when the
// outbox is empty again, so the agent does not keep it while idle.
func TestBacklogSignalled(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-backlog", symmetric: true})
	var mu sync.Mutex
	var calls []bool
	d.tweak = func(o *agent.Options) {
		o.Backlog = func(b bool) { mu.Lock(); calls = append(calls, b); mu.Unlock() }
	}
	spool := d.cfg.Telemetry.SpoolDir
	if err := os.MkdirAll(spool, 0o770); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		spoolPut(t, spool, fmt.Sprintf("b%03d.json", i), []byte(fmt.Sprintf(`{"backlog":%d}`, i)))
	}
	// The hub refuses until all 200 are queued, so the drain meets a backlog.
	if st := az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 3600}, nil); st >= 300 {
		t.Fatalf("refuse: %d", st)
	}
	d.start()
	testenv.Eventually(t, 30*time.Second, "200 queued", func() bool {
		st := d.status()
		return st != nil && st.OutboxDepth >= 200
	})
	az.Admin("DELETE", "/faults", nil, nil)
	testenv.Eventually(t, 60*time.Second, "all delivered, backlog over", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(bodiesWith(az, "gw-backlog", "backlog")) == 200 && len(calls) >= 2 && !calls[len(calls)-1]
	})
	mu.Lock()
	defer mu.Unlock()
	if !calls[0] {
		t.Fatalf("Backlog calls %v: want true first", calls)
	}
	for i := 1; i < len(calls); i++ {
		if calls[i] == calls[i-1] {
			t.Fatalf("Backlog calls %v: each must change the state", calls)
		}
	}
}
