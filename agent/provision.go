package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/gwagent/gwagent/agent/network"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/diskspace"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/provisioning"
)

// OnboardingCredential loads the factory credential the config names: the
// onboarding key and its installed chain (x509), or the symmetric key.
func OnboardingCredential(ctx context.Context, cfg *Config, keys *Keys) (provisioning.Credential, error) {
	switch cfg.Onboarding.Kind {
	case OnboardingX509:
		u, err := keystore.Parse(cfg.Onboarding.Key)
		if err != nil {
			return nil, fmt.Errorf("onboarding key: %w", err)
		}
		signer, err := keys.Signer(ctx, u)
		if err != nil {
			return nil, fmt.Errorf("onboarding key: %w", err)
		}
		chain, err := tlsconf.LoadChain(cfg.Onboarding.Chain)
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("onboarding chain %s is missing: run the factory step (`gwagent onboard csr`, sign it, `gwagent onboard install --chain FILE`)", cfg.Onboarding.Chain)
		}
		if err != nil {
			return nil, fmt.Errorf("onboarding chain: %w", err)
		}
		if err := checkOnboardingChain(chain, signer.Public(), cfg.Identity.RegistrationID); err != nil {
			return nil, fmt.Errorf("onboarding chain %s: %w", cfg.Onboarding.Chain, err)
		}
		return provisioning.X509Credential{Signer: signer, Chain: chain}, nil
	case OnboardingSymmetricKey:
		b, err := readSecretFile(cfg.Onboarding.SymmetricKeyFile)
		if err != nil {
			return nil, fmt.Errorf("onboarding symmetric key: %w", err)
		}
		k, err := provisioning.ParseSymmetricKey(string(b), cfg.Onboarding.GroupKey, cfg.Identity.RegistrationID)
		if err != nil {
			return nil, fmt.Errorf("onboarding symmetric key %s: %w", cfg.Onboarding.SymmetricKeyFile, err)
		}
		return k, nil
	case OnboardingTPM:
		tpm, err := onboardingTPM(ctx, cfg, keys)
		if err != nil {
			return nil, err
		}
		return provisioning.TPMCredential{TPM: tpm}, nil
	}
	return nil, fmt.Errorf("onboarding kind %q not supported", cfg.Onboarding.Kind)
}

// onboardingTPM opens the TPM of [onboarding] tpm (shared with TPM keys in
// the same TPM: one connection per device).
func onboardingTPM(ctx context.Context, cfg *Config, keys *Keys) (provisioning.TPMAttestor, error) {
	u, err := TPMDevice(cfg.Onboarding.TPM)
	if err != nil {
		return nil, fmt.Errorf("onboarding tpm: %w", err)
	}
	ks, err := keys.Store(ctx, u)
	if err != nil {
		return nil, fmt.Errorf("onboarding tpm: %w", err)
	}
	tpm, ok := ks.(provisioning.TPMAttestor)
	if !ok {
		return nil, fmt.Errorf("onboarding tpm: %s cannot do TPM attestation", u)
	}
	return tpm, nil
}

// RegistrationID is the device's registration id: [identity]
// registration_id, or with TPM attestation and none configured, the id the
// Azure SDKs derive from the endorsement key.
func RegistrationID(ctx context.Context, cfg *Config, keys *Keys) (string, error) {
	if cfg.Identity.RegistrationID != "" || cfg.Onboarding.Kind != OnboardingTPM {
		return cfg.Identity.RegistrationID, nil
	}
	o, err := OnboardTPM(ctx, cfg.Onboarding.TPM, "", keys)
	if err != nil {
		return "", fmt.Errorf("registration id from the EK: %w", err)
	}
	return o.RegistrationID, nil
}

// readSecretFile reads a secret that only the service may read.
func readSecretFile(path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %04o; it holds a secret: run `chmod 600 %s`", path, st.Mode().Perm(), path)
	}
	return os.ReadFile(path)
}

// ProvisionOptions tunes Provision.
type ProvisionOptions struct {
	// Progress, if set, receives one line per step; OnStep the step itself.
	Progress func(string)
	OnStep   func(provisioning.Step)
	// Clock times DPS's waits and judges the issued certificate; default
	// clock.Real.
	Clock clock.Clock
	// ClientVersion is sent to DPS as the user agent, e.g. "gwagent/1.2.0".
	ClientVersion string
	// Stage leaves the new identity staged as the next generation instead of
	// committing it (renewal: the swap commits after the hub accepted it).
	Stage bool
}

// Provision gets a new operational identity from DPS and commits it: a
// fresh P-384 key in the operational key store (in the slot the current
// identity does not use), a CSR, registration with the onboarding
// credential, validation of the issued chain, and an atomic store. On any
// failure the previous identity stays current and untouched.
func Provision(ctx context.Context, cfg *Config, keys *Keys, opts ProvisionOptions) (_ *provisioning.Identity, err error) {
	defer func() { err = spaceAdvice(cfg, err) }()
	say := func(format string, a ...any) {
		if opts.Progress != nil {
			opts.Progress(fmt.Sprintf(format, a...))
		}
	}
	now := clock.Or(opts.Clock).Now
	store, err := provisioning.OpenStore(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	roots, err := tlsconf.LoadPool(cfg.TrustBundle)
	if err != nil {
		return nil, fmt.Errorf("%w; set trust_bundle to the PEM file of CAs for DPS and IoT Hub", err)
	}
	cred, err := OnboardingCredential(ctx, cfg, keys)
	if err != nil {
		return nil, err
	}
	// The onboarding key signs DPS's TLS handshake: watched, so that a TPM
	// or token that fails there stops the registration at once and is
	// reported as the key store's problem, not DPS's.
	octx, cancel := context.WithCancel(ctx)
	defer cancel()
	var onb *watchedSigner
	if x, ok := cred.(provisioning.X509Credential); ok {
		onb = &watchedSigner{Signer: x.Signer, onFail: func(error) { cancel() }}
		x.Signer = onb
		cred = x
	}
	regID, err := RegistrationID(ctx, cfg, keys)
	if err != nil {
		return nil, err
	}

	slot, err := freeSlot(cfg, store)
	if err != nil {
		return nil, err
	}
	say("creating a new P-384 operational key at %s", slot)
	signer, err := keys.Fresh(ctx, slot)
	if err != nil {
		return nil, fmt.Errorf("operational key: %w", err)
	}
	nw, err := network.Choose(cfg.Network, cfg.StateDir, now(), cfg.Network.DPSWebSocketPort)
	if err != nil {
		return nil, fmt.Errorf("dps: %w", err)
	}
	dps := provisioning.DPSConfig{
		Network:        nw.Options,
		Endpoint:       cfg.Identity.DPSEndpoint,
		IDScope:        cfg.Identity.IDScope,
		RegistrationID: regID,
		APIVersion:     cfg.Identity.APIVersion,
		Transport:      cfg.Identity.DPSTransport,
		Roots:          roots,
		Credential:     cred,
		Timeout:        cfg.Identity.ProvisioningTimeout.Duration,
		Clock:          opts.Clock,
		ClientVersion:  opts.ClientVersion,
		Progress: func(s provisioning.Step) {
			say("%s", s)
			if opts.OnStep != nil {
				opts.OnStep(s)
			}
		},
	}
	issued, err := provisioning.Obtain(octx, dps, signer, now(), nil)
	if err != nil && onb != nil && ctx.Err() == nil {
		if serr := onb.failure(); serr != nil {
			err = &keyStoreError{fmt.Errorf("DPS %s: signing the TLS handshake with the onboarding key %s: %w", cfg.Identity.DPSEndpoint, keyName(cfg.Onboarding.Key), serr)}
		}
	}
	if err != nil {
		// The fresh key belongs to nothing; do not leave it behind.
		if derr := keys.Delete(context.WithoutCancel(ctx), slot); derr != nil {
			err = fmt.Errorf("%w (and removing the unused key failed: %v)", err, derr)
		}
		return nil, err
	}
	say("validated the issued chain (%d certificates, leaf serial %s)", len(issued.Chain), provisioning.FormatSerial(issued.Chain[0].SerialNumber))
	save := store.Save
	if opts.Stage {
		save = store.Stage
	}
	id, err := save(&provisioning.Identity{
		KeyURI:         slot.Secret(),
		RegistrationID: regID,
		DeviceID:       issued.State.DeviceID,
		AssignedHub:    issued.State.AssignedHub,
		IssuedAt:       now().UTC(),
		Via:            "dps",
	}, issued.Chain)
	if err != nil {
		// Nothing was stored (a full disk, say): the fresh key belongs to
		// nothing either.
		if derr := keys.Delete(context.WithoutCancel(ctx), slot); derr != nil {
			err = fmt.Errorf("%w (and removing the unused key failed: %v)", err, derr)
		}
		return nil, err
	}
	if opts.Stage {
		say("staged the new identity as %s", id.Generation)
		return id, nil
	}
	if err := store.Prune(); err != nil {
		say("warning: %v", err)
	}
	say("stored the new identity as %s", id.Generation)
	return id, nil
}

// keyName names a key URI for messages, never with its PIN.
func keyName(raw string) string {
	u, err := keystore.Parse(raw)
	if err != nil {
		return "(the configured key)"
	}
	return u.String()
}

// freeSlot picks the operational key location the current identity does
// not use: the configured key URI, or its alternate.
func freeSlot(cfg *Config, store *provisioning.Store) (*keystore.URI, error) {
	base, err := keystore.Parse(cfg.Operational.Key)
	if err != nil {
		return nil, fmt.Errorf("operational key: %w", err)
	}
	cur, err := store.Current()
	if errors.Is(err, provisioning.ErrNotProvisioned) {
		return base, nil
	}
	if err != nil {
		return base, nil // an unreadable identity is being replaced
	}
	if cu, err := keystore.Parse(cur.KeyURI); err == nil && cu.String() == base.String() {
		return base.Alternate()
	}
	return base, nil
}

// errNoSpace is a write that failed because a file system is full, with
// what to do about it.
type errNoSpace struct {
	err error
	dir string
}

func (e *errNoSpace) Error() string {
	return fmt.Sprintf("%v; the file system of %s is full: free space there (df -h %s; df -i %s for inodes); "+
		"the current certificate, if any, stays in use, and gwagent retries once there is room", e.err, e.dir, e.dir, e.dir)
}

func (e *errNoSpace) Unwrap() error { return e.err }

// spaceAdvice adds to an error that says a file system is full which one
// (the state directory, or the directory of the file that could not be
// written) and what to do.
func spaceAdvice(cfg *Config, err error) error {
	var already *errNoSpace
	if err == nil || !diskspace.NoSpace(err) || errors.As(err, &already) {
		return err
	}
	dir := cfg.StateDir
	var pe *fs.PathError
	if errors.As(err, &pe) && pe.Path != filepath.Clean(dir) && !strings.HasPrefix(pe.Path, filepath.Clean(dir)+string(filepath.Separator)) {
		dir = filepath.Dir(pe.Path)
	}
	return &errNoSpace{err: err, dir: dir}
}

// noteFullDisk raises CondDiskFull if err says a file system is full, naming
// the directory spaceAdvice found, and reports whether it did.
func (a *Agent) noteFullDisk(err error) bool {
	dir := a.cfg.Load().StateDir
	var ns *errNoSpace
	if errors.As(err, &ns) {
		dir = ns.dir
	}
	return a.noteNoSpace(dir, err)
}

// wroteAgain is called after writing the identity store or a key succeeded:
// if CondDiskFull is raised and there is room again, it clears it.
func (a *Agent) wroteAgain() {
	if a.diskFull() {
		a.roomAgain()
	}
}
