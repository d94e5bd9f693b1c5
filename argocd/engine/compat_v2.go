//go:build !argocd_v3

package main

import (
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/argoproj/argo-cd/v2/util/lua"
)

// executeResourceAction is VM.ExecuteResourceAction of Argo CD v2 (no action parameters).
func executeResourceAction(vm lua.VM, obj *unstructured.Unstructured, script string) ([]lua.ImpactedResource, error) {
	return vm.ExecuteResourceAction(obj, script)
}
