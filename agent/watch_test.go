package agent_test

import (
	"errors"
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

// When inotify cannot be had (the kernel's per-user instance limit is used
// up by other services, which made the spool go blind for good before),
// spool files are still delivered and config changes still applied, by
// scanning on a timer; status says so. The failing watcher is injected:
// exhausting the real limit would break every other test on the machine.
func TestWithoutInotify(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	d := newDevice(t, az, devOpts{regID: "gw-no-inotify", symmetric: true})
	d.tweak = func(o *agent.Options) {
		agent.WithoutInotify(o, errors.New("too many open files"))
	}
	spool := d.cfg.Telemetry.SpoolDir
	os.MkdirAll(spool, 0o770)
	r := d.start()
	testenv.Eventually(t, 30*time.Second, "connected", func() bool { return d.status().State == "connected" })
	for _, c := range []agent.Condition{agent.CondSpoolPolled, agent.CondConfigPolled} {
		if reason := d.status().Conditions[c]; !strings.Contains(reason, "too many open files") {
			t.Errorf("condition %s = %q, want the inotify error", c, reason)
		}
	}

	spoolPut(t, spool, "polled.json", []byte(`{"polled":1}`))
	testenv.Eventually(t, 20*time.Second, "a spool file delivered without inotify", func() bool {
		return countBodies(az, "gw-no-inotify", "polled") == 1
	})

	good, _ := os.ReadFile(d.path)
	changed := strings.Replace(string(good), `interval = "1h"`, `interval = "1s"`, 1)
	if changed == string(good) {
		t.Fatal("test config has no 1h interval to change")
	}
	os.WriteFile(filepath.Join(d.dir, "next.toml"), []byte(changed), 0o600)
	os.Rename(filepath.Join(d.dir, "next.toml"), d.path) // an atomic replace
	testenv.Eventually(t, 20*time.Second, "the config change applied without inotify", func() bool {
		return strings.Contains(r.log.String(), "config reloaded")
	})
}
