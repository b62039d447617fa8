package provisioning

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"time"
)

// Issued is what a registration with a CSR yields: DPS's registration state
// and the validated operational chain, leaf first.
type Issued struct {
	State *RegistrationState
	Chain []*x509.Certificate
}

// Obtain registers with DPS sending a CSR for signer's key (CN = the
// registration id) and returns the issued chain after validating it against
// the key, the assigned device id, the chain's own root (or anchors, if
// given) and now. Nothing is stored; the caller decides whether the chain
// becomes the current identity or a staged one.
func Obtain(ctx context.Context, dps DPSConfig, signer crypto.Signer, now time.Time, anchors *x509.CertPool) (*Issued, error) {
	dps.defaults()
	der, err := CSR(signer, dps.RegistrationID)
	if err != nil {
		return nil, err
	}
	st, err := Register(ctx, dps, der)
	if err != nil {
		return nil, err
	}
	if len(st.IssuedCertificateChain) == 0 {
		return nil, fmt.Errorf("dps: %w: DPS assigned device %q but returned no certificate; the enrollment needs a certificate issuance policy, and api_version %q must be 2025-07-01-preview or later",
			ErrBadChain, st.DeviceID, dps.APIVersion)
	}
	chain, err := DecodeChain(st.IssuedCertificateChain)
	if err != nil {
		return nil, fmt.Errorf("dps: %w", err)
	}
	// The CN is the registration id our CSR asked for, also when DPS
	// assigns another device id (individual enrollments).
	if err := ValidateChain(chain, signer.Public(), dps.RegistrationID, now, anchors); err != nil {
		return nil, fmt.Errorf("dps: %w", err)
	}
	return &Issued{State: st, Chain: chain}, nil
}
