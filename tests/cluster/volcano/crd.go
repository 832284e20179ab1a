// Package crd pins the Volcano API types that controller-gen renders into CRDs (see build.sh).
package crd

import _ "volcano.sh/apis/pkg/apis/scheduling/v1beta1"
