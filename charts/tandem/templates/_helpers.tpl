{{/* Names, labels and the image reference shared by the templates. */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's objects: "<release>-tandem-operator", or "tandem-operator" for a release named tandem. */}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if eq .Release.Name (include "tandem.name" .) -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s-operator" .Release.Name (include "tandem.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of the operator's pods: never change them (a Deployment's selector is immutable). */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "tandem.chart" . }}
{{- end -}}

{{/* Labels of objects that are not part of the operator (monitors, policies, dashboard). */}}
{{- define "tandem.commonLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "tandem.chart" . }}
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tandem.peeringName" -}}
{{- default (include "tandem.fullname" .) .Values.peering.name -}}
{{- end -}}

{{- define "tandem.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The labels the operator puts on every child of a ModelDeployment (operator/src/tandem_operator/builders.py:
build_labels). Monitors and policies select Tandem's pods by them.
*/}}
{{- define "tandem.workloadLabels" -}}
app.kubernetes.io/part-of: tandem
app.kubernetes.io/managed-by: tandem-operator
{{- end -}}

{{/*
The operator's RBAC rules, the same as manifests/rbac.yaml (a test checks). `peerings` is the peering
resource: clusterkopfpeerings (all namespaces) or kopfpeerings (namespaced mode).
*/}}
{{- define "tandem.rules" -}}
# Watch ModelDeployments (Kopf), read one per pass, write only its status.
- apiGroups: ["tandem.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["tandem.dev"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
# Children carry blockOwnerDeletion, which OwnerReferencesPermissionEnforcement (on in OpenShift)
# allows only to whoever may update the owner's finalizers.
- apiGroups: ["tandem.dev"]
  resources: ["modeldeployments/finalizers"]
  verbs: ["update"]
# The children: watched, read, created, patched, and deleted when a spec no longer wants them.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Warning Events about bad specs.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Kopf peering: replicas announce themselves so that only one acts.
- apiGroups: ["kopf.dev"]
  resources: [{{ .peerings | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end -}}

{{/* Refuse value combinations the schema cannot express. */}}
{{- define "tandem.validate" -}}
{{- if and (not .Values.peering.enabled) (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs peering.enabled: without peering every replica would act on every ModelDeployment" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.modelDeployments) -}}
{{- fail "networkPolicy.enabled needs networkPolicy.modelDeployments: [{name, namespace}, ...]" -}}
{{- end -}}
{{- if and .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled -}}
{{- fail "enable monitoring.serviceMonitor or monitoring.podMonitor, not both: each pod would be scraped twice" -}}
{{- end -}}
{{- end -}}
