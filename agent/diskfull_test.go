package agent_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// The file system of the state and spool directories fills up (a real
// tmpfs, out of blocks and inodes) while the hub is unreachable and local
// applications drop messages, one of them broken. No application message
// is lost: a spool file is deleted only after the hub acknowledged its
// message. Status (read from the file `gwagent status` reads), the log and
// the health messages say the disk is full and what to do; the agent keeps
// running, and starts again if restarted meanwhile; once the hub is back
// and space is freed, everything is delivered and the condition clears,
// without a restart.
//
// The file system runs out of inodes (no new file: outbox segment, status
// temp file, rejected/) or out of blocks (new files, but no data).
func TestSpoolDiskFull(t *testing.T) {
	t.Parallel()
	t.Run("out of inodes", func(t *testing.T) { spoolDiskFull(t, "gw-full-inodes", true) })
	t.Run("out of blocks", func(t *testing.T) { spoolDiskFull(t, "gw-full-blocks", false) })
}

func spoolDiskFull(t *testing.T, devID string, inodes bool) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: devID, symmetric: true})
	// The agent's timers (the outbox's write-behind, the settle time, the
	// look for room every 5 s, backoff) run on a clock the test moves.
	ft := testenv.StartFakeTime(t, time.Now())
	ft.Allow(3 * time.Second)
	d.clock = ft
	testenv.Tmpfs(t, d.cfg.StateDir, "size=1m,nr_inodes=256,mode=0700")
	if _, err := d.provision(); err != nil {
		t.Fatal(err)
	}
	spool := d.cfg.Telemetry.SpoolDir
	if err := os.MkdirAll(spool, 0o770); err != nil {
		t.Fatal(err)
	}
	r := d.start()
	testenv.Eventually(t, 20*time.Second, "connected", func() bool { return d.status().State == "connected" })
	if st := az.Admin("POST", "/faults/refuse", map[string]any{"target": "hub", "seconds": 3600}, nil); st >= 300 {
		t.Fatalf("refuse: %d", st)
	}
	testenv.Eventually(t, 20*time.Second, "the hub out of reach", func() bool { return d.status().State != "connected" })

	// A few messages first, which the outbox writes to disk after its
	// write-behind time: their acks will have no room.
	const n, early = 45, 5
	pad := strings.Repeat("x", 8000)
	for i := n - early; i < n; i++ {
		spoolPut(t, spool, fmt.Sprintf("m%02d.json", i), []byte(fmt.Sprintf(`{"full":%d,"pad":"%s"}`, i, pad)))
	}
	ft.Pass(t, 10*time.Second) // settle, queue, write behind
	testenv.Eventually(t, 30*time.Second, "the first messages written to the outbox", func() bool {
		segs, _ := filepath.Glob(filepath.Join(d.cfg.StateDir, "outbox", "*.seg"))
		for _, p := range segs {
			if st, err := os.Stat(p); err == nil && st.Size() > int64(early*len(pad)) {
				return true
			}
		}
		// On a loaded machine the intake may queue them only after the
		// clock passed: their write-behind is still ahead of it.
		ft.Allow(10 * time.Second)
		return false
	})

	// Then applications write their files beside the spool on the same
	// file system and rename them in; meanwhile the disk fills up. More
	// than the outbox holds in memory (256 KiB), so the outbox must write.
	stage := filepath.Join(d.cfg.StateDir, ".stage")
	os.Mkdir(stage, 0o700)
	for i := 0; i < n-early; i++ {
		os.WriteFile(filepath.Join(stage, fmt.Sprintf("m%02d.json", i)), []byte(fmt.Sprintf(`{"full":%d,"pad":"%s"}`, i, pad)), 0o640)
	}
	os.WriteFile(filepath.Join(stage, "broken.json"), []byte(`{"full":`), 0o640)
	free := testenv.Fill(t, d.cfg.StateDir, inodes)
	ents, _ := os.ReadDir(stage)
	for _, e := range ents {
		if err := os.Rename(filepath.Join(stage, e.Name()), filepath.Join(spool, e.Name())); err != nil {
			t.Fatal(err)
		}
	}

	ft.Pass(t, 2*time.Second) // the renamed files settle
	testenv.Eventually(t, 30*time.Second, "disk-full in the status file", func() bool {
		_, ok := d.status().Conditions[agent.CondDiskFull]
		return ok
	})
	reason := d.status().Conditions[agent.CondDiskFull]
	if !strings.Contains(reason, d.cfg.StateDir) || !strings.Contains(reason, "free space") || !strings.Contains(reason, "spool") {
		t.Fatalf("the disk-full reason does not say where and what to do: %q", reason)
	}
	if !strings.Contains(r.log.String(), "condition=disk-full") {
		t.Fatal("no disk-full condition in the log")
	}
	// Give the agent time to try (write-behind, spool retries), then check
	// that nothing was deleted while nothing could be delivered.
	ft.Pass(t, 12*time.Second)
	for i := 0; i < n; i++ {
		if _, err := os.Lstat(filepath.Join(spool, fmt.Sprintf("m%02d.json", i))); err != nil {
			t.Fatalf("spool file %d gone before the hub acknowledged it: %v", i, err)
		}
	}
	select {
	case err := <-r.done:
		r.done <- err
		t.Fatalf("the agent stopped: %v", err)
	default:
	}
	// A restart (say, the gateway rebooted) on the full disk: the agent
	// starts and says the disk is full.
	r.stop()
	r = d.start()
	testenv.Eventually(t, 30*time.Second, "the restarted agent's status", func() bool {
		select {
		case err := <-r.done:
			r.done <- err
			t.Fatalf("the agent did not start on the full disk: %v", err)
		default:
		}
		st := d.status()
		_, full := st.Conditions[agent.CondDiskFull]
		return st.PID == os.Getpid() && st.State != "stopped" && full
	})
	ft.Pass(t, 5*time.Second)
	select {
	case err := <-r.done:
		r.done <- err
		t.Fatalf("the agent did not start on the full disk: %v", err)
	case <-time.After(500 * time.Millisecond):
	}

	// The hub comes back while the disk is still full: what the outbox
	// holds in memory is delivered, and each file is deleted only after.
	az.Admin("DELETE", "/faults", nil, nil)
	ft.Allow(time.Minute) // reconnect
	testenv.Eventually(t, 60*time.Second, "messages delivered while the disk is full", func() bool {
		return len(bodiesWith(az, devID, "full")) > 0
	})
	assertNoLoss := func() map[int]bool {
		t.Helper()
		got := map[int]bool{}
		for _, v := range bodiesWith(az, devID, "full") {
			got[int(v.(float64))] = true
		}
		for i := 0; i < n; i++ {
			if _, err := os.Lstat(filepath.Join(spool, fmt.Sprintf("m%02d.json", i))); os.IsNotExist(err) && !got[i] {
				// The file may have gone just after our read of azsim.
				if !got2(az, devID, i) {
					t.Fatalf("spool file %d deleted but its message never reached the hub", i)
				}
			}
		}
		return got
	}
	assertNoLoss()

	free()
	ft.Allow(10 * time.Minute) // the look for room, settle times
	testenv.Eventually(t, 60*time.Second, "every message delivered and every file deleted after space was freed", func() bool {
		got := assertNoLoss()
		if len(got) < n {
			return false
		}
		for i := 0; i < n; i++ {
			if _, err := os.Lstat(filepath.Join(spool, fmt.Sprintf("m%02d.json", i))); err == nil {
				return false
			}
		}
		return true
	})
	testenv.Eventually(t, 30*time.Second, "the broken file moved aside and disk-full cleared", func() bool {
		_, err := os.Lstat(filepath.Join(spool, "rejected", "broken.json"))
		_, full := d.status().Conditions[agent.CondDiskFull]
		return err == nil && !full
	})
	if ents, _ := os.ReadDir(filepath.Join(spool, "rejected")); len(ents) != 1 {
		t.Fatalf("%d files in rejected/, want only broken.json", len(ents))
	}
	// And new messages flow as before, in the same run.
	spoolPut(t, spool, "after.json", []byte(`{"after":1}`))
	testenv.Eventually(t, 20*time.Second, "a message after the episode", func() bool {
		return len(bodiesWith(az, devID, "after")) == 1
	})
	for _, b := range bodiesWith(az, devID, "full") {
		if b == nil {
			t.Fatal("a broken body was sent")
		}
	}
	if bytes.Contains([]byte(r.log.String()), []byte("panic")) {
		t.Fatal("panic in the log")
	}
}

// got2 looks again whether message i reached the hub.
func got2(az *azsimtest.Azsim, devID string, i int) bool {
	for _, v := range bodiesWith(az, devID, "full") {
		if int(v.(float64)) == i {
			return true
		}
	}
	return false
}
