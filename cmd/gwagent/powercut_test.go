package main

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// TestPowerCutKeepsApplicationMessages: the outbox does not fsync spool
// messages (their spool file is the durable copy until the hub's PUBACK),
// so a power cut may take every outbox write since the last fsync. This
// test takes the worst case: the agent is SIGKILLed with 30 application
// messages queued and the outbox loses everything it wrote (segments
// emptied, as if none of their pages reached the flash). After the restart
// the hub must still get all 30, and the 10 the hub had acknowledged before
// (spool files deleted) must not be needed again.
func TestPowerCutKeepsApplicationMessages(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-powercut", "")
	cmd := d.start()
	testenv.Eventually(t, 30*time.Second, "provisioned", func() bool { return d.current() != nil })
	d.spoolFiles("acked", 10)
	testenv.Eventually(t, 30*time.Second, "10 messages acknowledged and their spool files deleted", func() bool {
		n, _ := bodies(az, "gw-powercut", "acked")
		m, _ := filepath.Glob(filepath.Join(d.spool, "acked*.json"))
		return n == 10 && len(m) == 0
	})
	az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 120}, nil)
	d.spoolFiles("queued", 30)
	testenv.Eventually(t, 10*time.Second, "30 messages queued in the outbox", func() bool {
		return outboxDepth(d) >= 30
	})
	// Unacknowledged messages are written out after the outbox's
	// write-behind delay (5 s): wait for that, so the cut has something to take.
	var segs []string
	testenv.Eventually(t, 30*time.Second, "queued messages written to an outbox segment", func() bool {
		segs, _ = filepath.Glob(filepath.Join(d.state, "outbox", "*.seg"))
		for _, s := range segs {
			if st, err := os.Stat(s); err == nil && st.Size() > 30*10 {
				return true
			}
		}
		return false
	})
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	for _, s := range segs {
		if err := os.Truncate(s, 0); err != nil {
			t.Fatal(err)
		}
	}
	if n, _ := bodies(az, "gw-powercut", "queued"); n != 0 {
		t.Fatalf("%d messages arrived while the hub refused connections", n)
	}
	az.Admin("DELETE", "/faults", nil, nil)
	az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 0}, nil)
	d.start()
	testenv.Eventually(t, 60*time.Second, "all 30 queued messages after the power cut", func() bool {
		n, _ := bodies(az, "gw-powercut", "queued")
		return n == 30
	})
	if n, _ := bodies(az, "gw-powercut", "acked"); n != 10 {
		t.Fatalf("%d of the 10 acknowledged messages at the hub", n)
	}
}
