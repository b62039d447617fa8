package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
	"github.com/gwagent/gwagent/devtools/testenv"
)

// Once provisioned, the agent executes itself again so that the process
// that serves the hub does not keep what provisioning left in memory. To
// systemd and the device's user that must be invisible: the same pid, no
// STOPPING=1, the watchdog fed, the status file never "stopped", and
// the readings queued before the registration delivered once each.
func TestRestartAfterProvisioningIsOneService(t *testing.T) {
	const watchdog = 3 * time.Second
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-fresh", "")
	d.spoolFiles("early", 5)
	ns := listenNotify(t)
	cmd := d.start("NOTIFY_SOCKET="+ns.path, "WATCHDOG_USEC=3000000")
	comm := func() string {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid))
		return strings.TrimSpace(string(b))
	}
	name := comm()
	testenv.Eventually(t, 60*time.Second, "the readings queued before provisioning delivered", func() bool {
		n, _ := bodies(az, "gw-fresh", "early")
		return n == 5
	})
	log := d.log()
	restart := strings.Index(log, "gwagent restarting in a fresh process for its new identity")
	if restart < 0 || strings.Count(log, `msg="gwagent starting"`) != 2 || strings.Index(log[restart:], `msg="gwagent starting"`) < 0 {
		t.Fatalf("want one start, provisioning, a restart in a fresh process and a second start:\n%s", log)
	}
	if strings.Contains(log[restart:], "msg=provisioning ") {
		t.Fatalf("the fresh process registered again:\n%s", log)
	}
	if !processRunning(cmd) {
		t.Fatalf("the agent's process (pid %d) ended:\n%s", cmd.Process.Pid, log)
	}
	if _, ok := ns.first("STOPPING=1"); ok {
		t.Fatal("systemd was told STOPPING=1 for a restart inside the service")
	}
	if got := comm(); got != name || got == "" {
		t.Fatalf("the process is named %q after the restart, %q before; ps and pgrep go by it", got, name)
	}
	var readies int
	last, _ := ns.first("READY=1")
	for _, m := range ns.all() {
		switch m.text {
		case "READY=1":
			readies++
		case "WATCHDOG=1":
			if m.at.Sub(last) >= watchdog {
				t.Fatalf("no WATCHDOG=1 for %s across the restart", m.at.Sub(last))
			}
			last = m.at
		}
	}
	if readies != 2 {
		t.Fatalf("READY=1 sent %d times; want once per process image", readies)
	}
	if _, total := bodies(az, "gw-fresh", "early"); total != 5 {
		t.Fatalf("%d copies of 5 readings delivered", total)
	}
	st, err := os.ReadFile(filepath.Join(d.state, "status.json"))
	if err != nil || strings.Contains(string(st), `"stopped"`) {
		t.Fatalf("status after the restart: %s %v", st, err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("SIGTERM after the restart: %v\n%s", err, d.log())
	}
	if _, ok := ns.first("STOPPING=1"); !ok {
		t.Fatal("no STOPPING=1 on SIGTERM")
	}
}

// A renewal is staged in one process image and swapped in by the next: a
// SIGHUP asks for a renewal through the hub, and the same process goes on
// with the new certificate, nothing lost or sent twice. (The agent is
// started a second time first: the first run restarted after provisioning
// moments ago, and restartGap holds back a second restart.)
func TestRestartForRenewalSwapsInTheNextImage(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-fresh-renew", "")
	cmd := d.start()
	testenv.Eventually(t, 30*time.Second, "connected", func() bool {
		return strings.Contains(d.log(), "to=connected")
	})
	cmd.Process.Signal(syscall.SIGTERM)
	cmd.Wait()
	from := len(d.log())
	cmd = d.start()
	testenv.Eventually(t, 30*time.Second, "connected again", func() bool {
		return strings.Contains(d.log()[from:], "to=connected")
	})
	first := d.current().Serial
	d.spoolFiles("before", 5)
	testenv.Eventually(t, 30*time.Second, "the first readings delivered", func() bool {
		n, _ := bodies(az, "gw-fresh-renew", "before")
		return n == 5
	})
	cmd.Process.Signal(syscall.SIGHUP)
	testenv.Eventually(t, 30*time.Second, "the renewed certificate in use", func() bool {
		cur := d.current()
		return cur != nil && cur.Serial != first && strings.Contains(d.log()[from:], "certificate renewed and in use")
	})
	d.spoolFiles("after", 5)
	testenv.Eventually(t, 30*time.Second, "the readings after the renewal delivered", func() bool {
		n, _ := bodies(az, "gw-fresh-renew", "after")
		return n == 5
	})
	log := d.log()[from:]
	staged := strings.Index(log, "new certificate staged")
	if staged < 0 {
		t.Fatalf("no renewal staged:\n%s", log)
	}
	rest := log[staged:]
	restart := strings.Index(rest, "gwagent restarting in a fresh process for its new identity")
	renewed := strings.Index(rest, "certificate renewed and in use")
	if restart < 0 || renewed < restart || strings.Count(log, `msg="gwagent starting"`) != 2 {
		t.Fatalf("want the renewal staged, a restart, and the swap in the fresh process:\n%s", log)
	}
	if !processRunning(cmd) {
		t.Fatalf("the agent's process ended:\n%s", log)
	}
	for _, key := range []string{"before", "after"} {
		if n, total := bodies(az, "gw-fresh-renew", key); n != 5 || total != 5 {
			t.Fatalf("%q readings: %d distinct, %d delivered; want 5 once each", key, n, total)
		}
	}
}

// An image that itself began with a restart does not restart again for a
// new identity within restartGap: a state directory that loses the
// identity would otherwise make a loop of registrations with DPS. The
// environment stands in for the previous image here.
func TestNoSecondRestartWithinTheGap(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-fresh-gap", "")
	d.spoolFiles("early", 3)
	cmd := d.start(restartedAtEnv + "=" + strconv.FormatInt(time.Now().Add(-time.Minute).Unix(), 10))
	testenv.Eventually(t, 30*time.Second, "the readings delivered", func() bool {
		n, _ := bodies(az, "gw-fresh-gap", "early")
		return n == 3
	})
	log := d.log()
	if strings.Contains(log, "gwagent restarting in a fresh process") || strings.Count(log, `msg="gwagent starting"`) != 1 {
		t.Fatalf("restarted again within the gap:\n%s", log)
	}
	if !strings.Contains(log, "going on in this process: it began with a restart less than 10 minutes ago") || !processRunning(cmd) {
		t.Fatalf("want the agent to say it goes on in the same process, and to run:\n%s", log)
	}
	// The question is asked once per new identity: reconnects do not ask
	// it again (past the gap they would restart for nothing).
	for i := 2; i <= 3; i++ {
		az.Admin("POST", "/faults/drop", map[string]any{"target": "hub"}, nil)
		testenv.Eventually(t, 30*time.Second, "connected again", func() bool {
			return strings.Count(d.log(), "to=connected") >= i
		})
	}
	if n := strings.Count(d.log(), "going on in this process"); n != 1 {
		t.Fatalf("asked %d times whether to restart for one new identity:\n%s", n, d.log())
	}
}

// A SIGHUP (systemctl reload, gwagent renew) that arrives while the agent
// restarts in place must not end it: systemd does not restart a service
// that SIGHUP ended. SIGHUPs every millisecond from the first start until
// the fresh image is connected.
func TestSIGHUPDuringTheRestart(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	d := newCrashDevice(t, az, "gw-fresh-hup", "")
	cmd := d.start()
	testenv.Eventually(t, 30*time.Second, "started", func() bool {
		return strings.Contains(d.log(), `msg="gwagent starting"`)
	})
	// Whether it ended is Wait's to say: /proc/PID/stat shows a zombie for
	// a moment while a thread other than the leader executes.
	var waitErr error
	ended := make(chan struct{})
	go func() { waitErr = cmd.Wait(); close(ended) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-ended }) // before start's own Wait
	sent := 0
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(d.log(), "to=connected") {
		select {
		case <-ended:
			t.Fatalf("the agent ended (%v) after %d SIGHUPs:\n%s", waitErr, sent, d.log())
		default:
		}
		cmd.Process.Signal(syscall.SIGHUP)
		sent++
		time.Sleep(time.Millisecond)
		if time.Now().After(deadline) {
			t.Fatalf("not connected after %d SIGHUPs:\n%s", sent, d.log())
		}
	}
	select {
	case <-ended:
		t.Fatalf("the agent ended (%v) after %d SIGHUPs:\n%s", waitErr, sent, d.log())
	case <-time.After(200 * time.Millisecond):
	}
	if !strings.Contains(d.log(), "gwagent restarting in a fresh process") {
		t.Fatalf("want the agent restarted in place:\n%s", d.log())
	}
	t.Logf("%d SIGHUPs across the restart", sent)
}
