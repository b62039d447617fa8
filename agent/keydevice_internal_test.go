package agent

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/tpm2"
)

// The TPM appears between the failed attempt and the wait for it (a driver
// loading just then; in TestLateTPM, the test's swtpm socket linked in at
// that moment): the agent retries at once instead of waiting out the whole
// backoff, which on the real clock had grown to minutes and in the test to
// the hour its policy allows. The error is the key store's own.
func TestTPMAppearedBeforeTheWait(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "tpm.sock")
	uri := "tpm2:socket=" + sock + ";blob=" + filepath.Join(dir, "op.tpmkey")
	u, err := keystore.Parse(uri)
	if err != nil {
		t.Fatal(err)
	}
	_, openErr := tpm2.Open(context.Background(), u)
	if openErr == nil {
		t.Fatal("opened a TPM that is not there")
	}
	a := &Agent{log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	a.cfg.Store(&Config{Operational: OperationalConfig{Key: uri}})
	if err := os.WriteFile(sock, nil, 0o600); err != nil { // the node appears
		t.Fatal(err)
	}
	var waited []time.Duration
	ok := a.waitKeyDevice(openErr, time.Hour, func(d time.Duration) bool {
		waited = append(waited, d)
		return true
	})
	if !ok || len(waited) != 0 {
		t.Fatalf("waitKeyDevice waited %v (returned %v) for a TPM that is there now; want an immediate retry", waited, ok)
	}
	// Still absent: it looks for the node once per devicePoll, up to the backoff.
	os.Remove(sock)
	waited = nil
	a.waitKeyDevice(openErr, 3*time.Second, func(d time.Duration) bool {
		waited = append(waited, d)
		return true
	})
	if len(waited) != 3 || waited[0] != devicePoll {
		t.Fatalf("waits %v while the TPM is absent, want three of %v", waited, devicePoll)
	}
}
