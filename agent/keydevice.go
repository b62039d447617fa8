package agent

import (
	"crypto"
	"errors"
	"io"
	"io/fs"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/gwagent/gwagent/keystore"
)

// devicePoll is how often a missing TPM device node is looked for.
const devicePoll = time.Second

// waitKeyDevice waits d before the next attempt, like wait, except when
// err says a TPM the config names is absent: then it looks for the device
// node once per devicePoll and returns as soon as one appears. A TPM whose
// driver loads after the service started (After=tpm2.target does not hold
// the service back on boards without a firmware TPM record, such as qemu's
// virt machine) is used at once instead of after a backoff that may have
// grown to minutes. It returns false if wait was cancelled.
func (a *Agent) waitKeyDevice(err error, d time.Duration, wait func(time.Duration) bool) bool {
	if !errors.Is(err, keystore.ErrDeviceAbsent) {
		return wait(d)
	}
	// The node the attempt did not find may have appeared since (the
	// error carries its path): then there is nothing to wait for.
	var pe *fs.PathError
	if errors.As(err, &pe) && errors.Is(err, fs.ErrNotExist) {
		if _, serr := os.Stat(pe.Path); serr == nil {
			a.log.Info("TPM device appeared; retrying", "path", pe.Path)
			return true
		}
	}
	missing := a.absentTPMs()
	if len(missing) == 0 {
		return wait(d)
	}
	a.log.Info("waiting for the TPM device to appear", "paths", missing, "at_most", d.Round(time.Second))
	for d > 0 {
		step := min(d, devicePoll)
		if !wait(step) {
			return false
		}
		d -= step
		for _, p := range missing {
			if _, err := os.Stat(p); err == nil {
				a.log.Info("TPM device appeared; retrying", "path", p)
				return true
			}
		}
	}
	return true
}

// absentTPMs lists the TPM device nodes (or swtpm sockets) the config's
// keys name that do not exist.
func (a *Agent) absentTPMs() []string {
	cfg := a.cfg.Load()
	var out []string
	var uris []*keystore.URI
	for _, raw := range []string{cfg.Onboarding.Key, cfg.Operational.Key} {
		if u, err := keystore.Parse(raw); err == nil {
			uris = append(uris, u)
		}
	}
	if u, err := TPMDevice(cfg.Onboarding.TPM); err == nil {
		uris = append(uris, u)
	}
	for _, u := range uris {
		if u.Scheme != keystore.SchemeTPM2 {
			continue
		}
		p, _ := u.TPMDevice()
		if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
			out = append(out, p)
		}
	}
	return out
}

// signingFailed is how a key-store-unavailable raised because the key
// opened but could not sign a handshake says so: only a signature that
// succeeds clears that one.
const signingFailed = "signing the TLS handshake with the operational key"

// keyStoreWorks clears key-store-unavailable once the key store did what it
// was failing to do: provisioning reached DPS, so the onboarding key opened
// and the new operational key was made and signed the CSR. Without it the
// condition (say "no TPM at /dev/tpmrm0") stayed up until DPS had answered,
// seconds to minutes after the TPM appeared.
func (a *Agent) keyStoreWorks() { a.status.Clear(CondKeyStoreUnavailable) }

// keyOpened is called when the operational key opened for a hub connection:
// a condition raised because a key could not be opened is over, even if the
// hub cannot be reached now (no signature then proves anything). One raised
// because a signature failed stays until a signature succeeds.
func (a *Agent) keyOpened() {
	if r, ok := a.status.Snapshot().Conditions[CondKeyStoreUnavailable]; ok && !strings.Contains(r, signingFailed) {
		a.status.Clear(CondKeyStoreUnavailable)
	}
}

// keyStoreError is a hub or DPS connection that failed because the
// operational or the onboarding key could not be opened or could not sign
// the TLS handshake (TPM gone, token pulled, key missing): the key store's
// problem, not the network's.
type keyStoreError struct{ err error }

func (e *keyStoreError) Error() string { return e.err.Error() }
func (e *keyStoreError) Unwrap() error { return e.err }

// watchedSigner remembers how its signatures went: the error of a signer
// that failed in a TLS handshake reaches dial only as text (TLS 1.3 in
// crypto/tls makes it "tls: failed to sign handshake: ...", paho formats
// connection errors with %s, DPS's retries end in "gave up after ..."),
// so keystore.ErrDeviceAbsent and the like would be lost. It wraps the
// operational key for the hub (session.go) and the X.509 onboarding key
// for DPS (provision.go).
type watchedSigner struct {
	crypto.Signer
	mu   sync.Mutex
	err  error // the last failure, nil once a signature succeeded
	good bool
	// onFail, if set, is called when a signature fails (with the lock
	// not held): provisioning stops at once instead of retrying DPS with
	// a key store that cannot sign.
	onFail func(error)
}

func (w *watchedSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := w.Signer.Sign(r, digest, opts)
	w.mu.Lock()
	w.err = err
	w.good = w.good || err == nil
	onFail := w.onFail
	w.mu.Unlock()
	if err != nil && onFail != nil {
		onFail(err)
	}
	return sig, err
}

// failure is the error of the last signature, if it failed.
func (w *watchedSigner) failure() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// signed reports whether a signature succeeded.
func (w *watchedSigner) signed() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.good
}
