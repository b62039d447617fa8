package agent_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// TestAzsimRestartE2E: the agent keeps working across a restart of azsim
// (every connection dropped, the same addresses and state afterwards), as
// across a restart or fail-over of the real hub: it reconnects on its own,
// what was spooled meanwhile arrives once, and direct methods reach it.
func TestAzsimRestartE2E(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-restart-1"})
	d.start()
	testenv.Eventually(t, 20*time.Second, "the first health message", func() bool { return len(received(az, "gw-restart-1", "health")) > 0 })
	spool := func(name string, i int) {
		t.Helper()
		p := filepath.Join(d.cfg.Telemetry.SpoolDir, fmt.Sprintf("%s%02d.json", name, i))
		if err := os.WriteFile(p+".tmp", []byte(fmt.Sprintf(`{%q:%d}`, name, i)), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(p+".tmp", p); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		spool("before", i)
	}
	testenv.Eventually(t, 10*time.Second, "5 messages before the restart", func() bool { return countBodies(az, "gw-restart-1", "before") == 5 })

	az.Restart()
	for i := range 5 {
		spool("after", i)
	}
	testenv.Eventually(t, 30*time.Second, "5 messages after the restart", func() bool { return countBodies(az, "gw-restart-1", "after") == 5 })
	if n := countBodies(az, "gw-restart-1", "before"); n != 5 {
		t.Errorf("%d messages from before the restart, want 5 (none resent)", n)
	}
	var res struct {
		Status  int            `json:"status"`
		Payload map[string]any `json:"payload"`
	}
	testenv.Eventually(t, 20*time.Second, "a ping answered after the restart", func() bool {
		return az.Admin("POST", "/hub/devices/gw-restart-1/methods/ping?timeout=5", "{}", &res) == 200 && res.Payload["pong"] == true
	})
}
