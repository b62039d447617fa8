package agent_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gwagent/gwagent/agent"
	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/devtools/testenv"
	"github.com/gwagent/gwagent/internal/clocksync"
	"github.com/gwagent/gwagent/internal/retry"
	"github.com/gwagent/gwagent/provisioning"
)

// TestLateTPM: the TPM appears after the agent started, as on a board
// whose TPM driver loads late. The backoff is an hour, so only the agent's
// watch for the device node can bring it up within the test's deadline;
// once before provisioning and once with an identity (the reboot case).
func TestLateTPM(t *testing.T) {
	t.Parallel()
	sw := testenv.StartSWTPM(t)
	az := azsimtest.Start(t, azsim.Config{})
	dir := t.TempDir()
	late := filepath.Join(dir, "tpm.sock") // the "device node", absent at start
	d := newDevice(t, az, devOpts{symmetric: true, opKey: "tpm2:socket=" + late + ";blob=" + filepath.Join(dir, "op.tpmkey")})

	start := func() (stop func()) {
		opts := agent.Options{
			Logger:  slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
			Version: "test",
			Backoff: retry.Policy{Min: time.Hour, Max: time.Hour},
		}
		a, err := agent.New(d.path, opts)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- a.Run(ctx) }()
		return func() { cancel(); <-done }
	}
	waitTPM := func(phase string) {
		testenv.Eventually(t, 30*time.Second, phase+": key-store-unavailable raised", func() bool {
			_, ok := d.status().Conditions[agent.CondKeyStoreUnavailable]
			return ok
		})
		if err := os.Symlink(sw.Sock, late); err != nil {
			t.Fatal(err)
		}
		testenv.Eventually(t, 30*time.Second, phase+": connected once the TPM appeared", func() bool {
			return d.status().State == "connected"
		})
	}

	stop := start()
	waitTPM("first start")
	first := d.current()
	stop()

	os.Remove(late)
	stop = start()
	defer stop()
	waitTPM("restart with an identity")
	if id := d.current(); id.Serial != first.Serial {
		t.Fatalf("the restart re-provisioned: serial %s, was %s", id.Serial, first.Serial)
	}
}

// TestLateTPMConditionClears: key-store-unavailable ("no TPM at ...") goes
// as soon as the TPM that appeared has made the new key, not once DPS has
// answered. azsim's DPS asks for a 5 s wait before the assignment, so a
// condition cleared only by the finished provisioning is seen still raised
// well after the TPM worked (the image check once showed it 7 s late).
func TestLateTPMConditionClears(t *testing.T) {
	sw := testenv.StartSWTPM(t)
	az := azsimtest.Start(t, azsim.Config{RetryAfter: 5})
	dir := t.TempDir()
	late := filepath.Join(dir, "tpm.sock")
	d := newDevice(t, az, devOpts{symmetric: true, opKey: "tpm2:socket=" + late + ";blob=" + filepath.Join(dir, "op.tpmkey")})
	a, err := agent.New(d.path, agent.Options{
		Logger:  slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Version: "test",
		Backoff: retry.Policy{Min: time.Hour, Max: time.Hour},
		// Not this machine's NTP state.
		ClockSync: func(time.Time) clocksync.Reading { return clocksync.Reading{Source: clocksync.NTP, Detail: "test"} },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()

	testenv.Eventually(t, 30*time.Second, "key-store-unavailable raised", func() bool {
		_, ok := d.status().Conditions[agent.CondKeyStoreUnavailable]
		return ok
	})
	if err := os.Symlink(sw.Sock, late); err != nil {
		t.Fatal(err)
	}
	appeared := time.Now()
	var provisionedWhenCleared bool
	testenv.Eventually(t, 30*time.Second, "key-store-unavailable cleared", func() bool {
		if _, ok := d.status().Conditions[agent.CondKeyStoreUnavailable]; ok {
			return false
		}
		if s, err := provisioning.OpenStore(d.cfg.StateDir); err == nil {
			_, err = s.Current()
			provisionedWhenCleared = err == nil
		}
		return true
	})
	t.Logf("cleared %s after the TPM appeared", time.Since(appeared).Round(10*time.Millisecond))
	if provisionedWhenCleared {
		t.Fatal("key-store-unavailable was cleared only once provisioning had finished, not when the TPM worked")
	}
	testenv.Eventually(t, 60*time.Second, "connected", func() bool { return d.status().State == "connected" })
}
