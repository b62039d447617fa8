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
	"github.com/gwagent/gwagent/internal/retry"
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
