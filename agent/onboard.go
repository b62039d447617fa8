package agent

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/keystore"
	"github.com/gwagent/gwagent/keystore/tpm2"
	"github.com/gwagent/gwagent/provisioning"
)

// OnboardCSR is the factory step's first half: it creates the onboarding
// key the config names (or reuses it if it exists; created reports which)
// and returns a CSR for the factory CA with CN = the registration id.
func OnboardCSR(ctx context.Context, cfg *Config, keys *Keys) (csrDER []byte, created bool, err error) {
	if cfg.Onboarding.Kind != OnboardingX509 {
		return nil, false, fmt.Errorf("onboard csr: [onboarding] kind is %q; the factory CSR is for kind = \"x509\"", cfg.Onboarding.Kind)
	}
	u, err := keystore.Parse(cfg.Onboarding.Key)
	if err != nil {
		return nil, false, fmt.Errorf("onboard csr: %w", err)
	}
	ks, err := keys.Store(ctx, u)
	if err != nil {
		return nil, false, fmt.Errorf("onboard csr: %w", err)
	}
	signer, err := ks.CreateKey(ctx, u)
	created = err == nil
	if errors.Is(err, keystore.ErrKeyExists) {
		signer, err = ks.Signer(ctx, u)
	}
	if err != nil {
		return nil, false, fmt.Errorf("onboard csr: %w", err)
	}
	der, err := provisioning.CSR(signer, cfg.Identity.RegistrationID)
	if err != nil {
		return nil, false, fmt.Errorf("onboard csr: %w", err)
	}
	return der, created, nil
}

// OnboardInstall is the factory step's second half: it checks that the
// chain the factory CA returned belongs to the onboarding key and the
// registration id, and installs it atomically at [onboarding] chain.
func OnboardInstall(ctx context.Context, cfg *Config, keys *Keys, chainFile string, now time.Time) ([]*x509.Certificate, error) {
	if cfg.Onboarding.Kind != OnboardingX509 {
		return nil, fmt.Errorf("onboard install: [onboarding] kind is %q; chains are for kind = \"x509\"", cfg.Onboarding.Kind)
	}
	chain, err := tlsconf.LoadChain(chainFile)
	if err != nil {
		return nil, fmt.Errorf("onboard install: %w", err)
	}
	u, err := keystore.Parse(cfg.Onboarding.Key)
	if err != nil {
		return nil, fmt.Errorf("onboard install: %w", err)
	}
	signer, err := keys.Signer(ctx, u)
	if err != nil {
		return nil, fmt.Errorf("onboard install: %w", err)
	}
	if err := checkOnboardingChain(chain, signer.Public(), cfg.Identity.RegistrationID); err != nil {
		return nil, fmt.Errorf("onboard install: %s: %w", chainFile, err)
	}
	if err := provisioning.CheckValidity(chain[0], now); err != nil {
		return nil, fmt.Errorf("onboard install: %w", err)
	}
	var buf bytes.Buffer
	for _, c := range chain {
		pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	if err := os.MkdirAll(filepath.Dir(cfg.Onboarding.Chain), 0o755); err != nil {
		return nil, fmt.Errorf("onboard install: %w", err)
	}
	if err := atomicfile.Write(cfg.Onboarding.Chain, buf.Bytes(), 0o644); err != nil {
		return nil, fmt.Errorf("onboard install: %w", err)
	}
	return chain, nil
}

// checkOnboardingChain checks what DPS will check of an X.509 onboarding
// chain, so a wrong file fails at the factory, not in the field: the leaf is
// for our key, its CN is the registration id, and each certificate is signed
// by the next.
func checkOnboardingChain(chain []*x509.Certificate, pub crypto.PublicKey, regID string) error {
	leaf := chain[0]
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if k, ok := leaf.PublicKey.(equaler); !ok || !k.Equal(pub) {
		return errors.New("the first certificate is not for the onboarding key; install the chain the factory CA issued for this device's CSR")
	}
	if leaf.Subject.CommonName != regID {
		return fmt.Errorf("certificate CN %q is not the registration id %q; DPS requires them to be equal", leaf.Subject.CommonName, regID)
	}
	for i := 0; i+1 < len(chain); i++ {
		if err := chain[i].CheckSignatureFrom(chain[i+1]); err != nil {
			return fmt.Errorf("certificate %d (%q) is not signed by certificate %d (%q); the file must be leaf first, then each issuer", i, chain[i].Subject, i+1, chain[i+1].Subject)
		}
	}
	return nil
}

// TPMOnboarding is what a manufacturer records to enroll a TPM-attested
// device in DPS (an individual enrollment with TPM attestation).
type TPMOnboarding struct {
	// RegistrationID is [identity] registration_id, or the id derived from
	// the EK when the config names none.
	RegistrationID string
	// EndorsementKey is the EK's TPM2B_PUBLIC (DPS wants it base64).
	EndorsementKey []byte
	// EKCert is the EK certificate from the TPM's NV, or nil.
	EKCert *x509.Certificate
}

// OnboardTPM reads the endorsement key of the TPM that tpmURI names
// ("tpm2:device=..." or "tpm2:socket=..."). regID, if not empty, is the
// configured registration id.
func OnboardTPM(ctx context.Context, tpmURI, regID string, keys *Keys) (*TPMOnboarding, error) {
	u, err := TPMDevice(tpmURI)
	if err != nil {
		return nil, fmt.Errorf("onboard tpm: %w", err)
	}
	ks, err := keys.Store(ctx, u)
	if err != nil {
		return nil, fmt.Errorf("onboard tpm: %w", err)
	}
	st, ok := ks.(*tpm2.Store)
	if !ok {
		return nil, fmt.Errorf("onboard tpm: %s is not a TPM", u)
	}
	e, err := st.Endorsement(ctx)
	if err != nil {
		return nil, fmt.Errorf("onboard tpm: %w", err)
	}
	if regID == "" {
		regID = provisioning.TPMRegistrationID(e.Public)
	}
	return &TPMOnboarding{RegistrationID: regID, EndorsementKey: e.Public, EKCert: e.Cert}, nil
}
